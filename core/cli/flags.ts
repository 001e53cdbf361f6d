// Derives command-line flags from a contract method's argument schema, so the CLI never
// re-declares what the contract already says.
import { z } from 'zod';

export type FieldKind = 'string' | 'number' | 'boolean' | 'string[]' | 'enum';

export interface FieldInfo {
  key: string;
  flag: string; // kebab-case, without dashes
  kind: FieldKind;
  required: boolean;
  secret: boolean;
  /** string[] whose values may be given as comma lists */
  commaList: boolean;
  description: string;
  defaultValue: unknown;
  options?: readonly string[];
}

export function kebab(key: string): string {
  return key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
}

/** Unwraps optional/default layers, collecting what each layer says. */
export function describeField(key: string, schema: z.ZodType): FieldInfo {
  let s: z.ZodType = schema;
  let required = true;
  let secret = false;
  let commaList = false;
  let description = '';
  let defaultValue: unknown;
  for (;;) {
    const meta = z.globalRegistry.get(s) as { secret?: boolean; commaList?: boolean; description?: string } | undefined;
    if (meta?.secret) secret = true;
    if (meta?.commaList) commaList = true;
    if (!description && meta?.description) description = meta.description;
    const def = (s as unknown as { def: { type: string; innerType?: z.ZodType; defaultValue?: unknown } }).def;
    if (def.type === 'optional') {
      required = false;
      s = def.innerType!;
    } else if (def.type === 'default') {
      required = false;
      defaultValue = typeof def.defaultValue === 'function' ? (def.defaultValue as () => unknown)() : def.defaultValue;
      s = def.innerType!;
    } else break;
  }
  const type = (s as unknown as { def: { type: string; element?: z.ZodType } }).def.type;
  let kind: FieldKind;
  let options: readonly string[] | undefined;
  if (type === 'string') kind = 'string';
  else if (type === 'number') kind = 'number';
  else if (type === 'boolean') kind = 'boolean';
  else if (type === 'enum') {
    kind = 'enum';
    options = (s as unknown as { options: string[] }).options;
  } else if (type === 'array') kind = 'string[]';
  else throw new Error(`contract field ${key}: type ${type} has no CLI form`);
  return { key, flag: kebab(key), kind, required, secret, commaList, description, defaultValue, ...(options ? { options } : {}) };
}

export function fieldsOf(args: z.ZodObject): FieldInfo[] {
  return Object.entries(args.shape).map(([key, schema]) => describeField(key, schema as z.ZodType));
}

/** One line of usage per field, for --help. */
export function flagUsage(f: FieldInfo, positional: boolean): string {
  if (positional) return `  ${f.key.toUpperCase().padEnd(28)} ${f.description}`;
  let form: string;
  if (f.secret) form = `--${f.flag}-file F | --${f.flag}-stdin`;
  else if (f.kind === 'boolean') form = f.defaultValue === true ? `--no-${f.flag}` : `--${f.flag}`;
  else if (f.kind === 'string[]') form = f.commaList ? `--${f.flag} V[,V…] (repeatable)` : `--${f.flag} V (repeatable)`;
  else if (f.kind === 'enum') form = `--${f.flag} ${f.options?.join('|')}`;
  else form = `--${f.flag} ${f.kind === 'number' ? 'N' : 'V'}`;
  const dflt = f.defaultValue !== undefined && f.kind !== 'boolean' && !(Array.isArray(f.defaultValue) && f.defaultValue.length === 0) && f.defaultValue !== ''
    ? ` (default ${String(f.defaultValue)})`
    : '';
  return `  ${form.padEnd(28)} ${f.description}${dflt}${f.required ? ' (required)' : ''}`;
}

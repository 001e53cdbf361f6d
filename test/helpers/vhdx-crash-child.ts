// Crash-test child: opens a VHDX read-write and performs the seeded operations until it is killed.
// It prints "w K" before issuing operation K and "f K" once the flush at K has returned (all
// operations before K are then durable). Pipes are synchronous on Linux, so a printed line is out
// before the operation starts.
import { openVhdx } from '../../core/vhdx/mod.ts';
import { CRASH_BLOCK, SLOT, crashOps, slotContent } from './vhdx-crash-ops.ts';

const [path, seed, idBase, writesOnly] = process.argv.slice(2) as [string, string, string, string | undefined];
const img = await openVhdx(path, { readOnly: false });
process.stdout.write('ready\n');
let k = 0;
for (const op of crashOps(Number(seed), Number(idBase), writesOnly === 'writes-only')) {
  process.stdout.write(`w ${k}\n`);
  if (op.kind === 'write') await img.write(op.slot * SLOT, slotContent(op.id, op.slot));
  else if (op.kind === 'zero-block') await img.writeZeroes(op.block * CRASH_BLOCK, CRASH_BLOCK);
  else {
    await img.flush();
    process.stdout.write(`f ${k}\n`);
  }
  k++;
}

// A long call that reports progress (`progress: true` in the contract): how far it is, how fast it
// goes and how long it has left, computed here from its successive progress events, and its cancel
// (pass `signal` with the call). Kept in module state by its owner, so a page left and come back to
// still shows the call that is running.
import type { ProgressEvent } from '../../core/app/contract.ts';

/** Rate over the events of the last few seconds: steady, yet quick to follow a change of pace. */
const WINDOW_MS = 5000;
/** Events closer together than this say nothing reliable about the rate. */
const MIN_SPAN_MS = 200;

/** What a cancelled call leaves: the core removes any partial output before it answers `cancelled`. */
export const CANCELLED = 'Cancelled — nothing was written.';

export class Transfer {
  /** What runs or ran, in words: "Shielding /data/vm.img". The progress bar's accessible name. */
  label = $state('');
  /** The file it works on, for a page that shows one file's transfer only. */
  subject = $state('');
  running = $state(false);
  done = $state(0);
  /** 0 until the first event says how much there is. */
  total = $state(0);
  /** Bytes per second over the recent events; null until two events far enough apart. */
  rate = $state<number | null>(null);
  /** Seconds the whole call took, once finished. */
  elapsed = $state<number | null>(null);
  /** The outcome in words, once finished: a success or a refusal. */
  outcome = $state<string | null>(null);
  refusal = $state<string | null>(null);
  /** Cancel was asked for and the call has not answered yet. */
  cancelling = $state(false);
  /** Set once the call ended cancelled. */
  cancelled = $state<string | null>(null);

  percent: number = $derived(this.total > 0 ? Math.min(100, Math.floor((this.done * 100) / this.total)) : 0);
  /** Seconds left at the recent rate; null when unknown. */
  eta: number | null = $derived(this.running && this.rate && this.total > this.done ? (this.total - this.done) / this.rate : null);

  private started = 0;
  private samples: { t: number; done: number }[] = [];
  private controller = new AbortController();

  /** Returns the signal to pass as the call's `signal`: `cancel()` fires it. */
  start(label: string, subject = ''): AbortSignal {
    this.label = label;
    this.subject = subject;
    this.running = true;
    this.cancelling = false;
    this.done = this.total = 0;
    this.rate = this.elapsed = null;
    this.outcome = this.refusal = this.cancelled = null;
    this.samples = [];
    this.started = performance.now();
    this.controller = new AbortController();
    return this.controller.signal;
  }

  /** Asks the running call to stop; it ends through `stopped()` once the other side has cleaned up. */
  cancel(): void {
    if (!this.running || this.cancelling) return;
    this.cancelling = true;
    this.controller.abort();
  }

  /** Takes one progress event of the call; pass it as the call's `onProgress`. */
  readonly progress = (event: ProgressEvent): void => {
    if (!this.running) return;
    const t = performance.now();
    this.total = event.total;
    this.done = event.done;
    const samples = this.samples;
    samples.push({ t, done: event.done });
    while (samples.length > 2 && t - samples[1]!.t >= WINDOW_MS) samples.shift();
    const first = samples[0]!;
    if (t - first.t >= MIN_SPAN_MS) this.rate = ((event.done - first.done) * 1000) / (t - first.t);
  };

  /** The call succeeded: everything was done, whatever the last event that arrived said. */
  finish(outcome: string, total = this.total): void {
    this.total = this.done = total;
    this.elapsed = (performance.now() - this.started) / 1000;
    this.running = this.cancelling = false; // a cancel that came too late leaves the result standing
    this.outcome = outcome;
  }

  fail(refusal: string): void {
    this.running = this.cancelling = false;
    this.refusal = refusal;
  }

  /** The call answered `cancelled`. */
  stopped(): void {
    this.running = this.cancelling = false;
    this.cancelled = CANCELLED;
  }
}

// ---- words -------------------------------------------------------------------------------------

const UNITS = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** "512 bytes", "4 KiB", "1.5 GiB": binary units, as disk sizes are. */
export function formatBytes(n: number): string {
  if (n < 1024) return `${n} byte${n === 1 ? '' : 's'}`;
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  const text = value < 10 ? value.toFixed(1).replace(/\.0$/, '') : Math.round(value).toString();
  return `${text} ${UNITS[unit]}`;
}

export function formatRate(bytesPerSecond: number): string {
  return `${formatBytes(Math.round(bytesPerSecond))}/s`;
}

/** "0.4 s", "12 s", "3 min 5 s", "1 h 20 min". */
export function formatDuration(seconds: number): string {
  if (seconds < 10) return `${Math.max(0.1, Math.round(seconds * 10) / 10)} s`;
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min${s % 60 ? ` ${s % 60} s` : ''}`;
  const minutes = Math.round(s / 60);
  return `${Math.floor(minutes / 60)} h${minutes % 60 ? ` ${minutes % 60} min` : ''}`;
}

/** The line under a progress bar: where it is, how fast, how long to go — or how it went. */
export function transferDetail(t: Transfer): string {
  if (t.cancelling) return 'Cancelling…';
  if (!t.running) {
    if (t.elapsed === null || t.outcome === null) return '';
    const average = t.elapsed > 0 ? ` (${formatRate(t.total / t.elapsed)})` : '';
    return `${formatBytes(t.total)} in ${formatDuration(t.elapsed)}${average}.`;
  }
  if (t.total === 0) return 'Starting…';
  const parts = [`${formatBytes(t.done)} of ${formatBytes(t.total)}`];
  if (t.rate !== null) parts.push(formatRate(t.rate));
  if (t.eta !== null) parts.push(`about ${formatDuration(t.eta)} left`);
  return parts.join(' · ');
}

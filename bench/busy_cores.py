"""Training speed of train.py while another process takes a core: fixed thread counts against the
count that threads.py follows during the run.

    python bench/busy_cores.py [--model paligemma] [--quiet 15] [--busy 30] [--after 45] [--burners 1]

Runs `python train.py --model MODEL` three times, in turn: with --threads set to torch's default (the
cores), without --threads (threads.py chooses and follows the machine), and with --threads 1. Each
run goes through three phases, timed from its 5th step (data preparation and warm-up left out):
`--quiet` seconds as the machine is, `--busy` seconds while --burners processes spin on the CPU
(`while True: pass`, one core each), then `--after` seconds with them stopped. Prints a markdown table
of steps/s (and examples/s) in each phase and over all three, then what the adaptive run logged about
its threads, with the time of each line.

The runs have no evaluation, checkpoint or sample before they are stopped (SIGKILL, into a temporary
folder), so every second counted is training steps. On shared cores other people's work adds its own
load to the burners', so the numbers say how each choice copes with a busy machine, not how fast the
code is: run it again and the phases will differ, by tens of percent or more.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("quiet", "busy", "after")


def burn():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def timed_run(model, threads, phases, burners, out):
    """Run train.py, burners started and stopped between the phases: (per phase [start, end) seconds
    after the 5th step, [(seconds, step)], [(seconds, other line)], units per step and unit)."""
    argv = [sys.executable, str(ROOT / "train.py"), "--model", model, "--out", str(out), "--fresh",
            "--max-steps", "1000000", "--eval-every", "0", "--ckpt-every", "0", "--sample-tokens", "0",
            "--no-plot", "--log-every", "1"] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    steps, lines, started = [], [], threading.Event()

    def read():
        for line in proc.stdout:
            now = time.perf_counter()
            if line.startswith("step ") and "/" in line.split()[1]:
                steps.append((now, int(line.split()[1].split("/")[0])))
                if steps[-1][1] >= 5:
                    started.set()
            else:
                lines.append((now, line.rstrip()))
        started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started.wait()
    if proc.poll() is not None:
        raise SystemExit("train.py stopped before its 5th step:\n" + "\n".join(text for _, text in lines[-20:]))
    t0 = steps[-1][0]
    bounds = [0.0]
    for seconds in phases:
        bounds.append(bounds[-1] + seconds)
    spinning = []
    try:
        for phase, (start, end) in zip(PHASES, zip(bounds, bounds[1:])):
            if phase == "busy":
                spinning = [burn() for _ in range(burners)]
            time.sleep(max(0.0, t0 + end - time.perf_counter()))
            for p in spinning:
                p.kill()
                p.wait()
            spinning = []
    finally:
        for p in spinning:
            p.kill()
        proc.kill()
        proc.wait()
        reader.join()
    head = next(text for _, text in lines if " per step on " in text)
    per_step, unit = re.search(r"([\d,]+) (\S+) per step on ", head).groups()
    return (list(zip(bounds, bounds[1:])), [(t - t0, s) for t, s in steps], [(t - t0, text) for t, text in lines],
            int(per_step.replace(",", "")), unit, head)


def rate(steps, start, end):
    """Steps per second between start and end, from the times the steps were logged."""
    return sum(start <= t < end for t, _ in steps) / (end - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="paligemma", help="model file to train")
    p.add_argument("--quiet", type=float, default=15, help="seconds before the burners start")
    p.add_argument("--busy", type=float, default=30, help="seconds the burners spin")
    p.add_argument("--after", type=float, default=45, help="seconds after they stop")
    p.add_argument("--burners", type=int, default=1, help="processes that each keep a core busy")
    args = p.parse_args()
    cores = torch.get_num_threads()
    contenders = [(f"--threads {cores}", cores), ("adaptive (no --threads)", 0), ("--threads 1", 1)]
    print(f"{args.model}: {os.cpu_count()} CPUs, torch's default {cores} threads, load average {os.getloadavg()[0]:.2f} "
          f"at the start; {args.burners} burner(s) during the busy phase\n", flush=True)
    rows, logs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, threads in contenders:
            bounds, steps, lines, per_step, unit, head = timed_run(
                args.model, threads, (args.quiet, args.busy, args.after), args.burners, Path(tmp) / str(threads))
            rates = [rate(steps, a, b) for a, b in bounds] + [rate(steps, bounds[0][0], bounds[-1][1])]
            rows.append((name, rates, per_step, unit))
            if not threads:
                logs = [head] + [f"{t:+6.1f} s  {text}" for t, text in lines if "CPU thread" in text and text != head]
            print(f"{name}: " + ", ".join(f"{r:.2f}" for r in rates) + " steps/s", file=sys.stderr, flush=True)
    print(f"| threads | {' | '.join(f'{ph} ({s:.0f} s)' for ph, s in zip(PHASES, (args.quiet, args.busy, args.after)))} | all |")
    print("|---|" + "---:|" * 4)
    for name, rates, per_step, unit in rows:
        print(f"| {name} | " + " | ".join(f"{r:.2f} steps/s ({r * per_step:.0f} {unit}/s)" for r in rates) + " |")
    print("\nThe adaptive run (seconds from its 5th step; the burners spun from "
          f"{args.quiet:.0f} s to {args.quiet + args.busy:.0f} s):\n")
    for line in logs:
        print("    " + line)


if __name__ == "__main__":
    main()

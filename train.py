"""
Train any model file of this project: python train.py --model gpt_llama

The model file says what it needs (README.md, "How a model file plugs in"): TASK picks its data
pipeline (data.py), TRAIN_RECIPE the defaults of its flags (flags.py), Model.metrics() extra numbers to
log. Nothing here knows a model by name.

The loop: AdamW (fused where the device has it; only matrices decay), linear warmup then cosine decay to
min_lr_ratio of the peak, gradient clipping and accumulation, bf16 autocast on CUDA, DDP under torchrun
(gloo on CPU, nccl on CUDA). --max-steps fixes the length of the run; otherwise --time-budget seconds of
wall time from the start of this script, data preparation, evaluation and saving included: the number
of steps is re-estimated from the measured step time every 10 steps, the cosine decays over that
estimate, and training stops early enough for the final evaluation.

Checkpoints go to --out (default out/<model>, or out/<model>-<name of --data>) as runs.py lays them
out, written atomically and checked against their checksums when read. Running the same command again
resumes; the data order depends only on (seed, step), so a resumed run ends with the same weights as an
uninterrupted one. SIGINT and SIGTERM save and exit. A run that fails before its first checkpoint
removes what it wrote.

Fine-tuning: --init DIR starts from a Hugging Face checkpoint folder or a run folder, with its weights
and tokenizer; its config holds, but for the training context (the recipe's max_seq_len unless --set)
and a learning rate of flags.INIT_LR unless --lr. --lora R trains low-rank adapters instead of the
weights (lora.py), which runs.py saves merged and alone. A --data of conversations teaches the model to
answer in its chat format (conversations.py); a --data of preference pairs tunes it by DPO (preferences.py),
whose pipeline computes the loss (data.py: prepare and loss).

MFU is flops_per_token * tokens/s / the devices' peak FLOP/s (runs.peak_flops, or --peak-flops).
"""

import signal
import sys
import time

START = time.time()  # the time budget counts from here, so it covers importing torch too
INTERRUPTED = []
if __name__ == "__main__":
    # Ctrl-C while torch imports would raise inside its import machinery, print a traceback from
    # there and can leave a half-imported module behind; note the signal and stop once imports end.
    signal.signal(signal.SIGINT, lambda signum, frame: INTERRUPTED.append(signum))

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from llm_machinery import conversations, corpus, data, flags, images, lora, plot, preferences, runs, threads  # noqa: E402
from llm_machinery.corpus import UserError  # noqa: E402

if __name__ == "__main__":
    if INTERRUPTED:
        print("\ninterrupted while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, signal.default_int_handler)

# ------------------------------------------------------------------------------------------ the loop


def train(args):
    """Build the run, then step until the schedule or the time budget ends: evaluate, checkpoint and
    log on their own clocks, save and stop on a signal, and finish with a last evaluation and sample."""
    run = Run(args)
    if run.already_finished:
        run.log(f"{run.out} already holds a finished run of {run.state['step']} steps; "
                "pass --fresh to train again or a larger --max-steps to go on")
        if not (run.out / "loss.png").exists():
            run.plot()
        return 0
    try:
        run.start()
        while not run.plan():
            stop_requested = run.train_step()
            run.report()
            if run.due(args.eval_every) and not (stop_requested or run.step >= (run.total_steps or math.inf)):
                run.evaluate()
            if run.signal is not None:
                run.checkpoint()
                run.progress.print(f"stopped by {signal.Signals(run.signal).name} at step {run.step}; "
                                   f"checkpoint saved in {run.out}; run the same command to resume")
                return 128 + run.signal  # what shells and schedulers expect of a process ended by a signal
            if stop_requested:
                break
            if run.due(args.ckpt_every):
                run.checkpoint()
        run.finish()
    except BaseException:
        run.discard()
        raise
    return 0


def make_optimizer(model, args):
    """AdamW. Only matrices decay, as in big_vision: not norms, biases or embeddings (tied or not), nor
    vectors kept with extra unit dimensions, such as SigLIP's (1, 1, dim) probe."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            matrix = sum(n > 1 for n in p.shape) >= 2 and id(p) not in embeddings
            (decay if matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, **kwargs)


def lr_at(step, args, total_steps):
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at total_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if total_steps is None:
        return args.lr
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Run:
    """Everything one training run holds; the pieces the loop in train() calls.

    Construction checks every input and builds the data, the model and the optimizer, resuming from
    --out when it holds a checkpoint. It writes nothing (the output folder is only probed): the first
    files appear in start(), and discard() removes them if the run fails before its first checkpoint.
    """

    def __init__(self, args):
        self.args = args
        self.module = runs.import_model(args.model)
        self.task = self.module.TASK
        self.out = Path(args.out) if args.out else runs.default_out(args.model, args.data)
        self._distributed()
        self._data_and_model()
        self.state = None
        # Conversations (data with a chat format) usually teach a trained model to answer; without --init,
        # a new model learns from them alone, which is seldom what was meant.
        from_scratch_chat = args.init is None and "chat_format" in self.pipe.fingerprint
        if (self.out / "state.pt").exists() and not args.fresh:
            try:
                self.state = runs.load_checkpoint(self.out, self.model, self.config, args.model, self.pipe.fingerprint,
                                                  self.run_settings())
            except UserError as e:
                if from_scratch_chat:
                    raise UserError(f"conversations fine-tune a model given with --init, as in python train.py --init "
                                    f"out/{args.model} --data {args.data}; without it, this run is a new model that does "
                                    f"not fit the run in {self.out} ({str(e).partition('; ')[0].removeprefix(f'{self.out} ')})") from None
                raise
        elif from_scratch_chat and self.main_rank:
            print("no --init, so a new model learns from these conversations alone; to teach a trained model to answer, "
                  "give it with --init DIR", file=sys.stderr)
        self.already_finished = bool(self.state and self.state.get("finished")
                                     and (args.max_steps is None or args.max_steps <= self.state["step"]))
        if self.already_finished:
            return
        self._prepare_output()
        self._optimizer_and_state()
        self._loader()

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; True when every rank should stop after it."""
        started = time.perf_counter()
        args, model = self.args, self.model
        self.lr = lr_at(self.step, args, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        micro_batches = [next(self.batches) for _ in range(args.grad_accum)]
        # A model's loss is a mean over its micro-batch. Where micro-batches score different numbers of
        # tokens (answers of different lengths), the pipeline says how many in loss_weight, and each mean
        # counts by its share of the whole step, over every micro-batch and process: the step is then
        # that of one big batch. DDP averages the gradients over processes, hence the factor world.
        scales = [1 / args.grad_accum] * args.grad_accum
        if "loss_weight" in micro_batches[0]:  # then in every batch of every rank: they run the same pipeline
            weights = torch.stack([b.pop("loss_weight") for b in micro_batches]).double()
            total = weights.sum().to(self.device)
            if self.ddp:
                dist.all_reduce(total)
            scales = (weights * self.world / total.cpu()).tolist()
        loss_sum, metric_sums = torch.zeros((), device=self.device), {}
        for micro, (batch, scale) in enumerate(zip(micro_batches, scales)):
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            sync = micro == args.grad_accum - 1 or not self.ddp
            with (contextlib.nullcontext() if sync else model.no_sync()), self.autocast():
                # A pipeline with a loss of its own (DPO's, of pairs of answers) computes it from the model.
                loss, metrics = self.pipe.loss(model, batch) if hasattr(self.pipe, "loss") else (model(**batch)[1], {})
            (loss * scale).backward()
            loss_sum += loss.detach().float() * scale
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v.float() * scale
        # Stop when one more step would run into the time kept for the final evaluation and saving.
        over_time = bool(self.budget) and self.elapsed() + self.per_step > self.budget - self.reserve - self.eval_estimate()
        # One small all-reduce per step carries the loss, a non-finite flag and a stop request, so that
        # every rank takes the same decision; reading it back is the step's one wait for the device.
        values = [v / self.world for v in torch.stack([loss_sum, *metric_sums.values()]).tolist()]
        step_loss = values[0]
        flags = torch.tensor(
            [*values, float(not math.isfinite(step_loss)), float(self.signal is not None or over_time)],
            dtype=torch.float64, device=self.device,
        )
        if self.ddp:
            dist.all_reduce(flags)
        *totals, non_finite, stop_requested = flags.tolist()
        loss_total, self.step_metrics = totals[0], dict(zip(metric_sums, totals[1:]))
        if non_finite:
            self.progress.print("")
            kept = "no checkpoint was written"
            if self.saved or self.state is not None:
                kept = f"the last good checkpoint (step {runs.read_state(self.out)['step']}) in {self.out} is kept"
            raise UserError(f"the loss became {step_loss:.4g} at step {self.step + 1}, so training stopped; {kept}; try a lower --lr")
        self.loss = loss_total
        if args.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.first_step_time is None:
            self.first_step_time = time.time()
        # The tuner's tries are its own business; the log hears of the count only when it changes.
        if (change := self.threads.step(time.perf_counter() - started)) and self.threads.trying is None:
            if torch.get_num_threads() != self.shown_threads:
                self.shown_threads = torch.get_num_threads()
                self.progress.print(f"threads: {change}")
        return bool(stop_requested)

    def plan(self):
        """Refresh the schedule's length from the time left, counting the evaluations still to come:
        every 10 steps, and at the planned end in case the machine sped up. True when the run is over."""
        args = self.args
        done = self.step - self.run_start_step
        if done > 1:
            self.per_step = (time.time() - self.first_step_time - self.eval_seconds) / (done - 1)
        if self.budget and args.max_steps is None and done >= 6 and (done % 10 == 6 or self.step >= (self.total_steps or 0)):
            per_step_all = self.per_step + (self.eval_estimate() / args.eval_every if args.eval_every else 0.0)
            left = self.budget - self.elapsed() - self.reserve - self.eval_estimate()
            self.total_steps = self.step + max(0, int(left / per_step_all))
        return self.total_steps is not None and self.step >= self.total_steps

    def elapsed(self):
        return self.elapsed_before + time.time() - START

    def eval_estimate(self):
        """Seconds of one evaluation: measured, or guessed as a forward pass at three times training speed."""
        if self.n_evals:
            return self.eval_seconds / self.n_evals
        examples = self.pipe.eval_examples(self.config, self.args.eval_tokens)
        return examples * self.per_step / self.examples_per_step / 3

    def report(self):
        """The progress line, and a metrics record every log_every steps."""
        args, step = self.args, self.step
        if not (step % args.log_every == 0 or self.progress.tty or step == self.total_steps):
            return
        now = time.time()
        rate = self.units_per_step * (step - self.window_step) / max(1e-9, now - self.window_time)
        mfu = self.flops * rate / (self.peak * self.world) if self.flops and self.peak else None
        if self.total_steps:
            eta = (self.total_steps - step) * (now - self.run_start_time - self.eval_seconds) / max(1, step - self.run_start_step)
        else:
            eta = self.budget - self.elapsed()
        extra = {**self.step_metrics, **(self.raw_model.metrics() if hasattr(self.raw_model, "metrics") else {})}
        speed = f"{rate / 1e3:.1f}k" if rate >= 1000 else f"{rate:.0f}"
        # A total from the time budget is re-estimated as the run goes: it says so.
        total = self.total_steps if args.max_steps is not None else f"~{self.total_steps}" if self.total_steps else "?"
        text = (f"step {step}/{total} | loss {self.loss:.4f} | lr {self.lr:.2e} | "
                f"{speed} {self.unit}/s | MFU {f'{100 * mfu:.1f}%' if mfu is not None else '-'} | ETA {format_seconds(eta)}")
        # Summary metrics go on the line; indexed ones (per layer, per expert: names with digits)
        # only to metrics.jsonl and W&B.
        text += "".join(f" | {k} {v:.3g}" for k, v in extra.items() if not any(c.isdigit() for c in k))
        self.progress.update(step, text)
        if step % args.log_every == 0:
            self.record({"step": step, "loss": self.loss, "lr": self.lr, f"{self.unit}_per_s": rate, "mfu": mfu,
                         "time": self.elapsed(), **{k: float(v) for k, v in extra.items()}})
            self.window_time, self.window_step = now, step

    def record(self, entry):
        if self.main_rank:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.wandb is not None:
                self.wandb.log(entry, step=entry["step"])

    def evaluate(self, announce=True):
        t = time.time()
        result = self.pipe.evaluate(self.raw_model, self.config, self.args.batch_size, self.device, self.autocast,
                                    max_tokens=self.args.eval_tokens)
        self.eval_seconds, self.n_evals = self.eval_seconds + time.time() - t, self.n_evals + 1
        answers = result.pop("answers", None)  # text, not a metric (data.py)
        self.record({"step": self.step, **result})
        if self.best is None or result["val_loss"] < self.best["val_loss"]:
            self.best = {"step": self.step, "val_loss": result["val_loss"], "tensors": trained_tensors(self.raw_model)}
        if announce:
            self.progress.print(f"step {self.step} | {format_eval(result)}" + (f"\n{answers}" if answers else ""))
        return result

    def checkpoint(self, finished=False):
        if self.main_rank:
            # The best weights so far travel with the state, so that a resumed run ends as an
            # uninterrupted one does; where they are the current ones, the weights file holds them.
            best = self.best and {**self.best, "tensors": self.best["tensors"] if self.best["step"] < self.step else None}
            runs.save_checkpoint(self.out, self.raw_model, self.optimizer, self.config, self.args.model, self.task, {
                "best": best, "step": self.step, "total_steps": self.total_steps, "elapsed": self.elapsed(), "finished": finished,
                "model": self.args.model, "config": dataclasses.asdict(self.config), "run": self.run_settings(),
                "data": {"seed": self.args.seed, "step": self.step, "fingerprint": self.pipe.fingerprint},
            })
            self.saved = True
        if self.ddp:
            dist.barrier()

    def due(self, every):
        return bool(every) and self.step % every == 0

    def finish(self):
        args = self.args
        self.total_steps = self.step
        self.progress.print("")
        result = self.evaluate(announce=False)
        self.log(f"step {self.step} | {format_eval(result)} | {format_seconds(self.elapsed())}")
        # A model that learns its training set by heart gets worse on held-out data while its training
        # loss still falls; the run ends with the weights of its best evaluation, as transformers'
        # Trainer does with load_best_model_at_end.
        best = self.best
        if best["step"] < self.step:
            self.raw_model.load_state_dict(best["tensors"], strict=False)
            self.log(f"the validation loss was lowest at step {best['step']} ({best['val_loss']:.4f}), so the run "
                     f"ends with the weights of step {best['step']}, not those of step {self.step}")
        self.checkpoint(finished=True)
        self.log(f"weights in {self.out / 'model.safetensors'}")
        if self.main_rank and args.sample_tokens and hasattr(self.pipe, "demo"):
            self.log("sample:\n" + self.pipe.demo(self.raw_model, self.device, max_new_tokens=args.sample_tokens, seed=args.seed))
        self.plot()
        if self.wandb is not None:
            self.wandb.finish()

    def plot(self):
        if self.main_rank and not self.args.no_plot:
            png = plot.plot_run(self.out)
            if png:
                self.log(f"loss curve in {png}")

    def start(self):
        """The first writes: with --fresh, the old run goes (its state first); then the metrics file
        and the tokenizer."""
        raw, args = self.raw_model, self.args
        if self.main_rank:
            self.before = set()
            self.out.mkdir(parents=True, exist_ok=True)
            if args.fresh:
                for name in runs.RUN_FILES:
                    (self.out / name).unlink(missing_ok=True)
            self.before = set(self.out.iterdir())
            if self.state is None:
                (self.out / "metrics.jsonl").write_text("")
            else:
                runs.trim_metrics(self.out / "metrics.jsonl", self.step)
            self.pipe.save(self.out)
        n_params = raw.num_params() if hasattr(raw, "num_params") else sum(p.numel() for p in raw.parameters())
        self.log(f"{args.model}: {n_params / 1e6:.2f}M parameters, {self.pipe.describe()}, "
                 f"{self.units_per_step:,} {self.unit} per step on {self.world} x {self.device.type}"
                 + (f" ({threads.in_words(torch.get_num_threads())})" if self.device.type == "cpu" else ""))
        if args.lora:
            self.log(lora.describe(raw))
        if self.wandb is not None:
            self.wandb.init(project=args.wandb, config={**vars(args), "config": dataclasses.asdict(self.config)})

        def on_signal(signum, frame):
            self.signal = signum

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        self.model.train()

    def discard(self):
        """After a failure before this run's first checkpoint: remove what it wrote, so that out is
        left as it was (or gone, if this run made it). A resumed run's folder stays resumable as is."""
        if not self.main_rank or self.saved or self.state is not None or not hasattr(self, "before"):
            return
        for path in (set(self.out.iterdir()) if self.out.is_dir() else set()) - self.before:
            path.unlink() if path.is_file() else shutil.rmtree(path, ignore_errors=True)
        root = self.created_root
        if root is not None and root.is_dir() and not any(p.is_file() for p in root.rglob("*")):
            shutil.rmtree(root)

    # -- setup, called by __init__

    def _distributed(self):
        args = self.args
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = runs.pick_device(args.device)
        # One process on the CPU follows the machine with its thread count (threads.py); others keep theirs.
        self.threads = threads.start(args.threads, adaptive=self.device.type == "cpu" and not self.ddp)
        self.shown_threads = self.threads.threads
        if self.ddp:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.ddp else (0, 1)
        self.main_rank = self.rank == 0
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.device.type == "cuda" else contextlib.nullcontext
        )
        self.log = print if self.main_rank else (lambda *a, **k: None)
        self.wandb = None
        if args.wandb and self.main_rank:
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb needs the wandb package; install it with pip install -e \".[wandb]\"") from None
            self.wandb = wandb

    def _data_and_model(self):
        args = self.args
        init = None
        if args.init is not None:
            init = runs.load_init(args.init, self.module, args.overrides, args.init_context, args.dtype)
            if args.lora:
                torch.manual_seed(args.seed)  # the adapters' first weights
                try:
                    lora.wrap(init[0], args.lora, args.lora_alpha, args.lora_targets)
                except ValueError as e:
                    raise UserError(str(e)) from None
            if not data.takes_tokenizer(self.task):
                raise UserError(f"--init fine-tunes models whose data is text; the {self.task} pipeline of "
                               f"{args.model} trains its own tokenizer")
        if self.ddp and not self.main_rank:
            dist.barrier()  # rank 0 trains and caches the tokenizer and token files first
        self.pipe = data.pipeline(self.module, args, tokenizer=None if init is None else init[2])
        if self.ddp and self.main_rank:
            dist.barrier()
        if init is None:
            self.config = runs.build_config(self.module, {**args.overrides, **self.pipe.model_config()})
        else:
            self.config = init[1]
        self.pipe.check(self.config)  # both splits hold at least one example of the model's shape
        torch.manual_seed(args.seed)
        if init is not None:
            self.model = init[0]
        else:
            try:
                self.model = self.module.Model(self.config)
            except ValueError as e:
                raise UserError(f"invalid config: {e}") from None
        if hasattr(self.pipe, "prepare"):  # what the pipeline needs of the starting weights (data.py)
            self.pipe.prepare(self.model.to(self.device), self.device, args.batch_size, self.autocast)

    def run_settings(self):
        """What fixes the data order and the size of a step; a resumed run must keep them."""
        a = self.args
        settings = {"processes": self.world, "batch_size": a.batch_size, "grad_accum": a.grad_accum, "seed": a.seed}
        if a.init is not None:  # where the weights came from; a run resumed from other ones is another run
            settings["init"] = str(Path(a.init).resolve())
        if a.lora:  # the adapters' shapes and the frozen weights' dtype
            settings["lora"] = f"rank {a.lora}, alpha {a.lora_alpha:g}, {','.join(a.lora_targets or ['all'])} layers, {a.dtype}"
        return settings

    def _prepare_output(self):
        """Check that out can be written, leaving it as it was."""
        self.saved = False  # whether this run has written a checkpoint
        self.best = None  # {"step", "val_loss", "tensors"} of the lowest validation loss so far
        self.created_root = None  # the first folder of out's path that this run creates
        if not self.main_rank:
            return
        missing = [p for p in [self.out, *self.out.parents] if not p.exists()]
        self.created_root = missing[-1] if missing else None
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to the output folder {self.out} ({e.strerror or e}); pick another --out") from None
        finally:
            if self.created_root is not None and self.created_root.is_dir():
                shutil.rmtree(self.created_root)

    def _optimizer_and_state(self):
        args, state = self.args, self.state
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, args)
        self.step, self.total_steps, self.elapsed_before = 0, args.max_steps, 0.0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.elapsed_before = state["step"], state.get("elapsed", 0.0)
            self.total_steps = args.max_steps if args.max_steps is not None else state.get("total_steps")
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            self.log(f"resuming {self.out} at step {self.step}")
            self.best = state.get("best")
            if self.best and self.best["tensors"] is None:
                self.best["tensors"] = trained_tensors(self.model)
        else:
            torch.manual_seed(args.seed + self.rank)  # weights are equal on all ranks; dropout differs
        if self.rank != 0 and state is not None:  # the checkpoint holds rank 0's RNG state only
            torch.manual_seed(args.seed + self.rank + 7919 * self.step)

    def _loader(self):
        args, device = self.args, self.device
        self.raw_model = self.model
        if args.compile:
            self.model = torch.compile(self.model)
        if self.ddp:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        stream = self.pipe.stream(self.config, args.batch_size, seed=args.seed, start_step=self.step, rank=self.rank,
                                  world_size=self.world, grad_accum=args.grad_accum)
        workers = args.loader_workers if args.loader_workers is not None else (2 if device.type == "cuda" else 0)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
            # Its own generator: the default one would take a number from the global RNG, which
            # dropout uses, and shift a resumed run's random stream by one draw.
            generator=torch.Generator().manual_seed(args.seed),
        )
        self.batches = iter(loader)
        self.examples_per_step = self.world * args.grad_accum * args.batch_size
        self.unit, per_example = self.pipe.unit(self.config)
        self.units_per_step = self.examples_per_step * per_example
        flops = getattr(self.raw_model, "flops_per_token", None)
        self.flops = flops() if flops else None
        self.peak = args.peak_flops or runs.peak_flops(device)
        self.budget = args.time_budget
        self.reserve = 5.0 + (3.0 if args.sample_tokens else 0.0)  # final save, plot, sample and a margin
        self.eval_seconds, self.n_evals = 0.0, 0
        self.progress = Progress(args.log_every, self.main_rank)
        self.run_start_step, self.run_start_time = self.step, time.time()
        self.window_time, self.window_step = time.time(), self.step
        self.first_step_time = None  # the first step pays for warming up allocators and caches; time from after it
        self.per_step = 0.0
        self.signal = None
        self.step_metrics = {}  # the pipeline's measures of the last step (data.py: loss)


# ------------------------------------------------------------------------------------------ the log


def trained_tensors(model):
    """A CPU copy of what training changes: the parameters that take gradients (LoRA's adapters alone)
    and the buffers that the model updates itself (moe.py's balancing biases)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad} | {name for name, _ in model.named_buffers()}
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items() if name in trained}


def format_seconds(s):
    s = max(0, int(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_eval(result):
    """'val loss 4.1093 | ppl 60.91 | bpb 1.6902' from {"val_loss": ..., "val_ppl": ..., "val_bpb": ...}."""
    return " | ".join(
        ("val loss" if k == "val_loss" else k.removeprefix("val_").replace("_", " ")) + f" {v:.4f}"
        for k, v in result.items()
    )


class Progress:
    """A single updating line on a terminal, plain lines every log_every steps otherwise."""

    def __init__(self, log_every, enabled):
        self.tty, self.log_every, self.enabled, self.width = sys.stdout.isatty(), log_every, enabled, 0

    def update(self, step, text):
        if not self.enabled:
            return
        if self.tty:
            line = text.ljust(self.width)
            self.width = len(text)
            print("\r" + line, end="", flush=True)
        elif step % self.log_every == 0:
            print(text, flush=True)

    def print(self, text):
        if self.enabled:
            if self.tty and self.width:
                print()
                self.width = 0
            print(text, flush=True)


# ------------------------------------------------------------------------- commands that train nothing


def write_examples(folder):
    """The data the README's commands use, written where .gitignore keeps it out of the repository."""
    try:
        print(corpus.write_texts(folder / "texts"))
        print(images.write_pictures(folder / "pictures"))
        print(conversations.write_chats(folder / "pydoc_chats.jsonl"))
        print(preferences.write_prefs(folder / "pydoc_prefs.jsonl"))
    except OSError as e:
        raise UserError(f"cannot write the examples into {folder} ({e.strerror}); give a folder you can write to") from None
    return 0


def draw_again(folder):
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{folder} {what}; give a folder that train.py wrote, such as out/gpt_llama")
    if not (folder / "metrics.jsonl").is_file():
        raise UserError(f"{folder} holds no metrics.jsonl; give a folder that train.py wrote, such as out/gpt_llama")
    png = plot.plot_run(folder)
    if png:
        print(f"loss curve in {png}")
    return 0 if png else 2


def main(argv=None):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    torch_threads = torch.get_num_threads()
    try:
        args = flags.parse_args(sys.argv[1:] if argv is None else argv)
        if args.examples is not None:
            return write_examples(Path(args.examples))
        if args.plot is not None:
            return draw_again(Path(args.plot))
        return train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(torch_threads)
        if dist.is_initialized():
            # The DDP wrapper sits in reference cycles, so train() returning does not free it. Left to
            # the interpreter's exit, it would be torn down after its process group, and gloo then
            # aborts the process now and then ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

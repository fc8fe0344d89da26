"""The training loop every recovery method shares: data, optimizer, schedule, precision, masks, checkpoints.

Determinism (what makes a killed-and-resumed run end bit-identical to an uninterrupted one on CPU): the data
order is a function of (seed, sample index) alone, the learning rate a function of the step alone, and a
checkpoint holds everything else that changes while training: the trainable tensors, the optimizer state
(optimizers.optimizer_state_tensors), the method's own state (SpIEL's indices and accumulated gradients), the
random generators' states, the step reached and the loss log. The frozen weights are not saved: a resume rebuilds
the same starting model (the same recipe stages, which are deterministic) and then loads the checkpoint.

Checkpoints are written atomically: into a temporary sibling folder, renamed to `step-NNNNNN`, then the older one
is removed, so a run killed at any instant (SIGKILL included) leaves the last complete checkpoint readable.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import torch
from torch import nn

from sparseforge.core.sparsity_masks import attach_masks, check_masks, mask_sparsity, masks_from_model
from sparseforge.errors import UserInputError

CHECKPOINT_PREFIX = "step-"


class TokenWindows:
    """Non-overlapping windows of `seq_len` tokens of one text; sample k of the stream is window
    perm_e[k mod n] with e = k // n and perm_e a permutation seeded by (seed, e): every window once per epoch,
    and any position of the stream computable without replaying it."""

    def __init__(self, ids: list[int], seq_len: int, seed: int):
        n = len(ids) // seq_len
        if n < 1:
            raise UserInputError(f"the training text has {len(ids)} tokens, fewer than seq_len={seq_len}; use a longer text or a shorter seq_len")
        self.windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
        self.seed = seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.windows.shape[0]

    def sample(self, k: int) -> torch.Tensor:
        epoch, i = divmod(k, len(self))
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self), generator=g))
        return self.windows[self._perm[1][i]]

    def batch(self, start: int, size: int) -> torch.Tensor:
        return torch.stack([self.sample(start + j) for j in range(size)])


def training_text(source: str) -> str:
    from sparseforge.data import read_text

    if str(source) in ("heldout",):
        raise UserInputError("training on the held-out text is refused (it is what measures the result); use 'calibration' or a file")
    from sparseforge.data import HELDOUT_TEXT

    if str(source) not in ("calibration",) and pathlib.Path(source).is_file() and os.path.realpath(source) == os.path.realpath(HELDOUT_TEXT):
        raise UserInputError(f"'{source}' is the bundled held-out text, which measures the result; train on 'calibration' or another file")
    try:
        return read_text(source)
    except UnicodeDecodeError:
        raise UserInputError(f"training text '{source}' is not UTF-8 text; pass a UTF-8 text file") from None


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at 0-based `step`: linear warm-up (step+1)/warmup, then constant or
    cosine down to 10% at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclasses.dataclass
class RunOptions:
    """What `sparseforge finetune` adds to a plain stage run: checkpoints, evaluation, resume, a log callback."""

    checkpoint_dir: pathlib.Path | None = None
    save_every: int = 0
    eval_every: int = 0
    evaluate: Callable[[nn.Module], dict] | None = None  # e.g. held-out perplexity; monitoring only
    resume: bool = False
    fingerprint: dict = dataclasses.field(default_factory=dict)  # what must match for a resume (recipe, model, data)
    on_log: Callable[[dict], None] | None = None
    stop_after: int | None = None  # tests: stop (as if killed) after this many steps, without finishing


@dataclasses.dataclass
class TrainLog:
    steps: list[dict] = dataclasses.field(default_factory=list)  # {"step", "loss", "lr", "tokens_per_s"}
    evals: list[dict] = dataclasses.field(default_factory=list)  # {"step", ...metrics}
    resumed_from: int | None = None


class Stopped(Exception):
    """Raised by `train` when RunOptions.stop_after is reached (tests simulate a kill with it)."""


def _named_trainable(work: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in work.named_parameters() if p.requires_grad}


def train(method, model: nn.Module, tokenizer, targets=("*",), ignore=(), progress: bool = True, run: RunOptions | None = None):
    """Train `model` in place with `method` (a RecoveryMethod) and return its TrainingResult."""
    from sparseforge.methods.training.base import TrainingResult
    from sparseforge.methods.training.optimizers import build_optimizer, load_optimizer_state, optimizer_state_tensors

    run = run or RunOptions()
    p = method.params
    targets, ignore = list(targets), list(ignore)
    data = TokenWindows(tokenizer(training_text(p.data), add_special_tokens=False, verbose=False)["input_ids"], p.seq_len, p.seed)
    masks = masks_from_model(model)  # every pruned weight, targeted by this stage or not: all must stay pruned
    before = mask_sparsity(masks)
    handle = attach_masks(model, masks)
    torch.manual_seed(p.seed)  # LoRA's and SpIEL's initialisations draw from it
    was_training = model.training
    try:
        work = method.prepare(model, targets, ignore)
        handle.refresh()  # hook the masked weights that `prepare` unfroze
        trainable = method.trainable(work)
        if not trainable:
            raise UserInputError(f"'{method.name}' found nothing to train with targets {targets} and ignore {ignore}")
        optimizer = build_optimizer(p.optimizer, work, {"lr": p.lr, **p.optimizer_params}, trainable)
        log = TrainLog()
        start = 0
        if run.resume:
            start = _load_checkpoint(run, work, method, optimizer, log, load_optimizer_state)
        work.train()
        tokens_per_step = p.batch_size * p.grad_accum * p.seq_len
        bar = _progress(progress, p.steps, start, method.name)
        for step in range(start, p.steps):
            for group in getattr(optimizer, "param_groups", []):
                group["lr"] = p.lr * lr_factor(step, p.steps, p.warmup_steps, p.schedule)
            began = time.perf_counter()
            loss = _step(work, optimizer, data, step, p)
            handle.enforce()
            method.on_step_end(step, work, optimizer)
            seconds = time.perf_counter() - began
            entry = {"step": step + 1, "loss": loss, "lr": p.lr * lr_factor(step, p.steps, p.warmup_steps, p.schedule),
                     "tokens_per_s": tokens_per_step / seconds if seconds > 0 else None}
            log.steps.append(entry)
            if run.on_log:
                run.on_log(entry)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
                bar.update(1)
            done = step + 1
            if run.evaluate and run.eval_every and (done % run.eval_every == 0 or done == p.steps):
                work.eval()
                log.evals.append({"step": done, **run.evaluate(work)})
                work.train()
            if run.checkpoint_dir and run.save_every and done % run.save_every == 0 and done < p.steps:
                _save_checkpoint(run, done, work, method, optimizer, log, optimizer_state_tensors)
            if run.stop_after is not None and done >= run.stop_after:
                raise Stopped(done)
        if bar is not None:
            bar.close()
        model = method.finish(model, work)
    finally:
        handle.remove()
        model.train(was_training)
    report = check_masks(model, masks)
    n_trainable = sum(t.numel() for t in trainable)
    n_total = sum(t.numel() for t in model.parameters())
    losses = [e["loss"] for e in log.steps]
    result = TrainingResult(method.name, p.steps, p.steps * tokens_per_step, n_trainable, round(n_trainable / n_total, 6),
                            losses[0] if losses else None, losses[-1] if losses else None, p.optimizer, len(masks), round(before, 6),
                            round(_zero_share(model, masks), 6),
                            report.changed, method.report_fields())
    result.log = log  # the full loss log, for finetune's JSON and plot (not part of the stage report)
    result.mask_report = report
    return result


def _zero_share(model: nn.Module, masks: dict) -> float:
    """Share of exact zeros in the masked weights now (equal to the masks' sparsity when nothing changed)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    found = [params[k].detach() for k in masks if k in params]
    total = sum(t.numel() for t in found)
    return sum(int((t == 0).sum()) for t in found) / total if total else 0.0


def _step(work: nn.Module, optimizer, data: TokenWindows, step: int, p) -> float:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss."""
    first = step * p.grad_accum * p.batch_size
    batches = [data.batch(first + j * p.batch_size, p.batch_size) for j in range(p.grad_accum)]
    device = next(work.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.precision == "bf16")

    def forward(ids):
        ids = ids.to(device)
        with autocast:
            return work(input_ids=ids, labels=ids).loss.float()

    if getattr(optimizer, "zeroth_order", False):
        def closure():
            with torch.no_grad():
                return sum(forward(b) for b in batches) / len(batches)

        loss = optimizer.step(closure)
        return float(loss)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for ids in batches:
        loss = forward(ids) / len(batches)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


def _progress(enabled: bool, total: int, start: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"training ({name})", unit="step")


# -- checkpoints ---------------------------------------------------------------------------------------------------


def latest_checkpoint(directory: pathlib.Path) -> pathlib.Path | None:
    """The complete checkpoint of the highest step in `directory` (temporary folders are never complete)."""
    if not directory.is_dir():
        return None
    found = sorted(d for d in directory.iterdir() if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and (d / "state.json").is_file())
    return found[-1] if found else None


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def _save_checkpoint(run: RunOptions, step: int, work, method, optimizer, log: TrainLog, optimizer_state_tensors) -> pathlib.Path:
    from safetensors.torch import save_file

    directory = run.checkpoint_dir
    directory.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step:06d}.sparseforge-tmp-{os.getpid()}-", dir=directory))
    try:
        save_file({n: t.detach().cpu().contiguous() for n, t in _named_trainable(work).items()}, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_data = optimizer_state_tensors(optimizer)
        save_file({k: v.contiguous() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
        m_tensors, m_data = method.state()
        save_file({**{f"method.{k}": v.detach().cpu().contiguous() for k, v in m_tensors.items()}, **_rng_tensors()}, str(tmp / "state.safetensors"))
        state = {"step": step, "fingerprint": run.fingerprint, "optimizer": opt_data, "method": m_data,
                 "log": dataclasses.asdict(log), "threads": torch.get_num_threads()}
        # state.json last: its presence is what marks a checkpoint complete.
        (tmp / "state.json").write_text(json.dumps(state) + "\n", encoding="utf-8")
        final = directory / f"{CHECKPOINT_PREFIX}{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in directory.iterdir():
        if old.is_dir() and old.name.startswith(CHECKPOINT_PREFIX) and old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(run: RunOptions, work, method, optimizer, log: TrainLog, load_optimizer_state) -> int:
    from safetensors.torch import load_file

    from sparseforge.formats.safetensors_check import check_safetensors

    ckpt = latest_checkpoint(run.checkpoint_dir) if run.checkpoint_dir else None
    if ckpt is None:
        raise UserInputError(f"--resume: no complete checkpoint in '{run.checkpoint_dir}'; run without --resume to start afresh")
    try:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"checkpoint '{ckpt}' has an unreadable state.json ({type(exc).__name__}); remove it to start afresh") from None
    if state.get("fingerprint") != run.fingerprint:
        theirs, ours = state.get("fingerprint") or {}, run.fingerprint
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise UserInputError(f"checkpoint '{ckpt}' belongs to a different run (differs in {', '.join(differ) or 'settings'}); "
                             "resume with the same --model, --recipe, --data and --steps, or remove the checkpoints")
    for f in ("trainable.safetensors", "optimizer.safetensors", "state.safetensors"):
        check_safetensors(ckpt / f)
    if state.get("threads") not in (None, torch.get_num_threads()):
        # CPU kernels reduce in a thread-count-dependent order: the run goes on, but not bit for bit.
        print(f"sparseforge: the checkpoint was written with {state['threads']} torch thread(s), this run uses {torch.get_num_threads()}; "
              f"pass --threads {state['threads']} for a bit-identical resume", file=sys.stderr, flush=True)
    saved = load_file(str(ckpt / "trainable.safetensors"))
    params = _named_trainable(work)
    if set(saved) != set(params):
        raise UserInputError(f"checkpoint '{ckpt}' holds other trainable tensors than this run trains; remove it to start afresh")
    with torch.no_grad():
        for n, t in saved.items():
            if params[n].shape != t.shape:
                raise UserInputError(f"checkpoint '{ckpt}': '{n}' has shape {tuple(t.shape)}, this run {tuple(params[n].shape)}; remove it to start afresh")
            params[n].copy_(t)
    extra = load_file(str(ckpt / "state.safetensors"))
    method.load_state({k[len("method."):]: v for k, v in extra.items() if k.startswith("method.")}, state.get("method") or {})
    load_optimizer_state(optimizer, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
    torch.set_rng_state(extra["rng.torch"])
    if torch.cuda.is_available():
        cuda = [extra[k] for k in sorted(extra) if k.startswith("rng.cuda.")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    saved_log = state.get("log") or {}
    log.steps.extend(saved_log.get("steps", []))
    log.evals.extend(saved_log.get("evals", []))
    log.resumed_from = int(state["step"])
    return int(state["step"])


def write_loss_curve(log: TrainLog, path: pathlib.Path, title: str) -> None:
    """Loss per step (and any evaluation metric over steps on a second axis) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([e["step"] for e in log.steps], [e["loss"] for e in log.steps], label="training loss", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if log.evals and "perplexity" in log.evals[0]:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in log.evals], [e["perplexity"] for e in log.evals], "o-", color="tab:red", label="held-out perplexity")
        ax2.set_ylabel("held-out perplexity")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def log_document(log: TrainLog, extra: dict[str, Any]) -> dict:
    return {**extra, "resumed_from": log.resumed_from, "steps": log.steps, "evals": log.evals}

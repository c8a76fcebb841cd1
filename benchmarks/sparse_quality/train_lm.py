"""Train the byte-level LM of ``model.py`` on the Python standard library's source, with passkeys.

Corpus: every ``.py`` file under ``sysconfig.get_paths()['stdlib']`` (site-/dist-packages and
``__pycache__`` left out), in sorted order of relative path, joined with a NUL byte. A file is held out
when the first byte of the sha256 of its relative path is 0 mod 20 (about 5%), so the split depends
only on names.

Training sequences are random crops of the training stream; a fraction ``--passkey-frac`` carry
``--needles`` synthetic needles -- a line ``PASSKEY_<n> = "<8 digits>"`` at a random line start -- each
asked for again later as ``check_passkey(PASSKEY_<n> = "<8 digits>")``, at a log-uniform distance up to the
whole context, so that the model learns to retrieve across it; the answer digits weigh
``--answer-weight`` in the loss. Everything random is drawn from generators seeded by ``--seed`` and the step, so
the same arguments give the same data and the same initial weights.

``--short-len`` runs the first ``--short-frac`` of the steps at a short context with the same
tokens per step, a curriculum for learning retrieval before stretching it to the full context
(from scratch at 8192 bytes the model never learned to retrieve). The defaults (4000 steps, the
first half at 1024 bytes) are those of the published weights: about 3 minutes on an H200.

The step count is fixed by ``--steps``; with ``--steps 0 --short-len 0`` the script times the first
steps and derives the count from ``--train-seconds`` (it prints the count; pass it as ``--steps``).

    PYTHONPATH=packages/ucm-sparse/src python3 benchmarks/sparse_quality/train_lm.py --out lm.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import sysconfig
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import ByteLM, LMConfig, parameter_count, save_model  # noqa: E402

SEPARATOR = b"\x00"
DIGITS = 8

# ---- corpus ------------------------------------------------------------------------------------


def stdlib_files(root: str | None = None) -> tuple[str, list[str]]:
    """The stdlib root and its ``.py`` files (relative paths, sorted)."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        for name in filenames:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return root, sorted(found)


def is_heldout(relpath: str) -> bool:
    return hashlib.sha256(relpath.encode()).digest()[0] % 20 == 0


def load_corpus(root: str | None = None) -> dict:
    """``train`` and ``heldout`` byte streams (uint8 arrays) and a fingerprint of the corpus."""
    root, files = stdlib_files(root)
    parts = {"train": [], "heldout": []}
    digest = hashlib.sha256()
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        digest.update(rel.encode() + SEPARATOR + hashlib.sha256(data).digest())
        parts["heldout" if is_heldout(rel) else "train"].append(data)
    streams = {k: np.frombuffer(SEPARATOR.join(v), dtype=np.uint8) for k, v in parts.items()}
    return {
        "root": root,
        "files": len(files),
        "heldout_files": len(parts["heldout"]),
        "train": streams["train"],
        "heldout": streams["heldout"],
        "sha256": digest.hexdigest(),
    }


def heldout_windows(stream: np.ndarray, count: int, length: int) -> np.ndarray:
    """``count`` windows of ``length`` bytes, evenly spaced over the held-out stream: ``[count, length]``."""
    if len(stream) < length:
        raise ValueError(f"held-out stream ({len(stream)} bytes) is shorter than a window ({length})")
    starts = np.linspace(0, len(stream) - length, count).astype(np.int64)
    return np.stack([stream[s : s + length] for s in starts])


# ---- passkeys ----------------------------------------------------------------------------------


def snap_to_line(code: np.ndarray, position: int, limit: int) -> int:
    """The start of the line at or after ``position`` (at most ``limit``), else ``position``."""
    newlines = np.flatnonzero(code[position:limit] == ord("\n"))
    return position + int(newlines[0]) + 1 if len(newlines) else position


def needle(name: int, digits: str) -> bytes:
    return f'PASSKEY_{name} = "{digits}"\n'.encode()


def query(name: int, digits: str = "") -> bytes:
    """The question; with ``digits`` the whole answered line. It ends in the needle's own prefix
    ``PASSKEY_<n> = "`` (a keyword argument), so the answer is what followed that prefix earlier."""
    line = f'check_passkey(PASSKEY_{name} = "'
    return f'{line}{digits}")\n'.encode() if digits else line.encode()


def random_digits(rng: np.random.Generator) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, DIGITS))


def training_passkeys(
    code: np.ndarray, rng: np.random.Generator, length: int, needles: tuple[int, int] = (4, 12)
) -> tuple[np.ndarray, list[int]]:
    """A sequence of exactly ``length`` bytes: code from ``code`` with several needles at random line
    starts, each asked for (and answered) at a later line start; the distance from a needle to its
    question is log-uniform from 16 bytes to the whole context (clipped at the end), so short
    retrievals teach the skill and long ones stretch it. Also the positions of the answer digits."""
    count = int(rng.integers(needles[0], needles[1] + 1))
    names = rng.choice(1000, size=count, replace=False)
    keys = [(int(n), random_digits(rng)) for n in names]
    code_len = length - sum(len(needle(n, d)) + len(query(n, d)) for n, d in keys)
    while len(keys) > 1 and code_len < length // 2:  # short contexts: at least half stays code
        name, digits = keys.pop()
        code_len += len(needle(name, digits)) + len(query(name, digits))
    start = int(rng.integers(0, len(code) - code_len))
    body = code[start : start + code_len]
    items = []  # (position in body, needle before question, text, digits offset in text or -1)
    for name, digits in keys:
        at = snap_to_line(body, int(rng.uniform(0, 1) * code_len), code_len)
        distance = int(math.exp(rng.uniform(math.log(16), math.log(length))))
        asked = snap_to_line(body, min(code_len, at + distance), code_len)
        items.append((at, 0, needle(name, digits), -1))
        items.append((asked, 1, query(name, digits), len(query(name))))
    items.sort(key=lambda item: item[:3])
    pieces, last, size, digit_positions = [], 0, 0, []
    for at, _, text, offset in items:
        pieces += [body[last:at], np.frombuffer(text, dtype=np.uint8)]
        size += at - last
        if offset >= 0:
            digit_positions += range(size + offset, size + offset + DIGITS)
        size += len(text)
        last = at
    pieces.append(body[last:])
    sequence = np.concatenate(pieces)
    assert len(sequence) == length, (len(sequence), length)
    return sequence, digit_positions


def training_batch(
    stream: np.ndarray,
    seed: int,
    step: int,
    batch: int,
    length: int,
    passkey_frac: float,
    needles: tuple[int, int] = (4, 12),
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``[batch, length]`` bytes for one step and the (row, position) of passkey answer digits."""
    rng = np.random.default_rng([seed, step])
    rows, digits = [], []
    for row in range(batch):
        if rng.uniform() < passkey_frac:
            sequence, positions = training_passkeys(stream, rng, length, needles)
            digits += [(row, p) for p in positions]
        else:
            start = int(rng.integers(0, len(stream) - length))
            sequence = stream[start : start + length]
        rows.append(sequence)
    return np.stack(rows), digits


# ---- training ----------------------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate_ppl(model: ByteLM, windows: np.ndarray, device: torch.device, autocast: bool) -> float:
    """Mean next-byte NLL (nats) over whole windows, dense forward."""
    total, count = 0.0, 0
    for row in windows:
        x = torch.from_numpy(row.astype(np.int64))[None].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += x.shape[1] - 1
    return total / count


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="weights file to write (safetensors)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4000, help="0: derive from --train-seconds")
    p.add_argument("--train-seconds", type=float, default=180.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr-floor", type=float, default=0.1, help="final lr as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--passkey-frac", type=float, default=0.75)
    p.add_argument("--needles", default="16,32", help="needles per passkey sequence: min,max")
    p.add_argument("--answer-weight", type=float, default=20.0, help="loss weight of passkey answer digits")
    p.add_argument(
        "--short-len",
        type=int,
        default=1024,
        help="curriculum: run the first --short-frac of --steps at this context (same tokens per step); 0: off",
    )
    p.add_argument("--short-frac", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--stdlib", default=None, help="stdlib root (default: this interpreter's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # Model shape (defaults: LMConfig's); smaller ones are for quick CPU checks.
    for field in ("dim", "layers", "q_heads", "kv_heads", "head_dim", "hidden"):
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(LMConfig, field))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    t_start = time.perf_counter()
    corpus = load_corpus(args.stdlib)
    train, heldout = corpus["train"], corpus["heldout"]
    print(
        f"corpus: python {sys.version.split()[0]}, {corpus['root']}: {corpus['files']} files "
        f"({corpus['heldout_files']} held out), train {len(train) / 1e6:.2f} MB, held-out {len(heldout) / 1e6:.2f} MB, "
        f"sha256 {corpus['sha256']}"
    )

    cfg = LMConfig(
        dim=args.dim,
        layers=args.layers,
        q_heads=args.q_heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        hidden=args.hidden,
    )
    model = ByteLM(cfg)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    model.to(device)
    print(f"model: {cfg}, {parameter_count(model) / 1e6:.3f} M parameters")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=cuda,
    )
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

        def attention():
            return sdpa_kernel(backends)
    else:
        from contextlib import nullcontext as attention

    needles = tuple(int(n) for n in args.needles.split(","))
    if args.short_len and not args.steps:
        raise ValueError("--short-len needs --steps (the two phases run at different speeds)")
    short_steps = int(args.short_frac * args.steps) if args.short_len else 0
    short_batch = args.batch * args.seq_len // args.short_len if args.short_len else 0
    short_needles = tuple(max(1, n * args.short_len // args.seq_len) for n in needles) if args.short_len else ()
    total = args.steps or 10**9
    calib_from, calib_to = 5, 25  # steps timed to derive the count (all inside the warm-up)
    if not args.steps and args.warmup < calib_to:
        raise ValueError(f"--warmup must be at least {calib_to} when the step count is derived")
    history, window_loss, window_steps = [], torch.zeros((), device=device), 0
    tokens_per_step = args.batch * args.seq_len
    t_train = time.perf_counter()
    t_calib = t_train
    step = 0
    with attention():
        while step < total:
            if step < short_steps:  # short contexts first: retrieval is learned where it is easy to find
                batch, length, count = short_batch, args.short_len, short_needles
            else:
                batch, length, count = args.batch, args.seq_len, needles
            data, digits = training_batch(train, args.seed, step, batch, length + 1, args.passkey_frac, count)
            weights = np.ones((batch, length), dtype=np.float32)
            if digits:  # answer digits weigh more: the retrieval signal is a few bytes per context
                weights[tuple(np.array(digits).T - np.array([[0], [1]]))] = args.answer_weight
            x, weights = torch.from_numpy(data.astype(np.int64)), torch.from_numpy(weights)
            if cuda:
                x = x.pin_memory().to(device, non_blocking=True)
                weights = weights.pin_memory().to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.lr, args.warmup, args.lr_floor)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(x[:, :-1])
            per_token = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            loss = per_token.mean()  # what the log shows: plain next-byte loss
            weighted = (per_token * weights.flatten()).sum() / weights.sum()
            opt.zero_grad(set_to_none=True)
            weighted.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            window_loss += loss.detach()
            window_steps += 1
            step += 1
            if not args.steps and step in (calib_from, calib_to):
                if cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                if step == calib_from:
                    t_calib = now
                else:
                    per_step = (now - t_calib) / (calib_to - calib_from)
                    left = args.train_seconds - (now - t_train)
                    total = max(calib_to + 1, calib_to + int(left / per_step))
                    print(f"timed {per_step * 1e3:.0f} ms/step: {total} steps (rebuild with --steps {total})")
            if step % args.log_every == 0 or step == total:
                mean = float(window_loss) / window_steps
                with torch.no_grad():
                    if digits:
                        rows = torch.tensor([r for r, _ in digits], device=device)
                        cols = torch.tensor([c - 1 for _, c in digits], device=device)
                        hit = (logits[rows, cols].argmax(-1) == x[rows, cols + 1]).float().mean()
                        digit_acc = f"{float(hit):.3f}"
                    else:
                        digit_acc = "-"
                elapsed = time.perf_counter() - t_train
                history.append((step, mean))
                print(
                    f"step {step:5d}/{total} loss {mean:.4f} passkey-digit-acc {digit_acc} "
                    f"lr {opt.param_groups[0]['lr']:.2e} {step * tokens_per_step / elapsed / 1e3:.0f} ktok/s "
                    f"{elapsed:.0f} s"
                )
                window_loss.zero_()
                window_steps = 0
    if cuda:
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t_train

    model.eval()
    windows = heldout_windows(heldout, args.eval_windows, args.seq_len + 1)
    with attention():
        nll = evaluate_ppl(model, windows, device, autocast=cuda)
    print("loss curve (step: mean train loss over the preceding log interval):")
    picks = sorted({history[round(i * (len(history) - 1) / 9)] for i in range(10)}) if history else []
    print("  " + ", ".join(f"{s}: {value:.3f}" for s, value in picks))
    print(
        f"trained {step} steps x {tokens_per_step} tokens = {step * tokens_per_step / 1e6:.1f} M tokens in "
        f"{train_seconds:.0f} s; final train loss {history[-1][1]:.4f}"
    )
    print(
        f"held-out: {args.eval_windows} windows of {args.seq_len} bytes, NLL {nll:.4f} nats/byte, "
        f"perplexity {math.exp(nll):.4f}, {nll / math.log(2):.4f} bits/byte"
    )
    meta = {
        "steps": step,
        "seed": args.seed,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "lr_floor": args.lr_floor,
        "weight_decay": args.weight_decay,
        "passkey_frac": args.passkey_frac,
        "needles": args.needles,
        "answer_weight": args.answer_weight,
        **({"short_len": args.short_len, "short_frac": args.short_frac} if args.short_len else {}),
        "final_train_loss": round(history[-1][1], 4),
        "heldout_ppl": round(math.exp(nll), 4),
        "python": sys.version.split()[0],
        "corpus_sha256": corpus["sha256"],
        "corpus_files": corpus["files"],
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
    }
    save_model(model, args.out, meta)
    with open(args.out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"saved {args.out}: {os.path.getsize(args.out)} bytes, sha256 {digest}")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

"""Mutation check: does the test suite notice when a behaviour breaks?

Each mutation replaces one exact source snippet with a broken version in a temporary
copy of the repository and runs the test files that should catch it. A mutation is
*caught* when those tests fail (or time out); it *survives* when they all pass.

    .venv/bin/python bench/mutation_check.py              # every mutation (about 20-30 min on 2 cores)
    .venv/bin/python bench/mutation_check.py --list       # names only
    .venv/bin/python bench/mutation_check.py beam-score-x100 unk-not-masked   # some of them

Exit status: 0 when every mutation is caught; 1 when one survives, or when a snippet no
longer occurs exactly once in its file (the list must follow the code; it cannot rot
silently); 2 when the unmutated tests already fail in the copy. See docs/mutation.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    find: str  # must occur exactly once in the file
    replace: str
    tests: tuple[str, ...]  # test files (or node ids) expected to catch it


# the file most likely to catch a mutation comes first: pytest -x stops at the first failure
SEARCH_TESTS = ("tests/test_decoder_search.py", "tests/test_attention.py")
ATTENTION_TESTS = ("tests/test_attention.py", "tests/test_decoder_search.py")
BATCH_TESTS = ("tests/test_batch_failures.py", "tests/test_batch_cli.py")
SERVICE_TESTS = ("tests/test_service.py", "tests/test_hostile_inputs.py")

MUTATIONS: list[Mutation] = [
    # ---- the review's table (issue 21)
    Mutation(
        "attention-softmax-wrong-dim",
        "captioner/attention.py",
        "alpha = torch.softmax(e, dim=1)",
        "alpha = torch.softmax(e, dim=0)",
        ATTENTION_TESTS,
    ),
    Mutation(
        "context-is-mean-annotation",
        "captioner/attention.py",
        "context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)",
        "context = feats.mean(1)",
        ATTENTION_TESTS,
    ),
    Mutation(
        "length-penalty-negated",
        "captioner/search.py",
        "return ((5.0 + length.float()) / 6.0) ** alpha",
        "return ((5.0 + length.float()) / 6.0) ** -alpha",
        SEARCH_TESTS,
    ),
    Mutation(
        "beam-score-x100",
        "captioner/search.py",
        "final = scores.reshape(-1) / length_penalty(self.lengths, length_alpha)  # (R,)",
        "final = 100 * scores.reshape(-1) / length_penalty(self.lengths, length_alpha)  # (R,)",
        SEARCH_TESTS,
    ),
    Mutation(
        "batch-sigterm-handler-removed",
        "captioner/commands/caption.py",
        "old = signal.signal(signal.SIGTERM, _on_sigterm) if",
        "old = None if",
        BATCH_TESTS,
    ),
    Mutation(
        "batch-no-per-image-retry",
        "captioner/batch.py",
        "captions[k] = run_model(batch.images[row : row + 1])[0]",
        "raise RuntimeError('no retry')",
        BATCH_TESTS,
    ),
    Mutation(
        "undecodable-upload-answered-200",
        "service/captions.py",
        "raise ApiError(status, code, public_message(str(exc))) from None",
        'decoded = __import__("types").SimpleNamespace(original_size=(64, 64), thumbnail=None, '
        'image=__import__("PIL.Image").Image.new("RGB", (64, 64)))',
        SERVICE_TESTS,
    ),
    Mutation(
        "resume-dedupe-dropped",
        "captioner/commands/caption.py",
        "todo = [p for p in paths if outputs.path_key(p) not in status]",
        "todo = list(paths)",
        BATCH_TESTS,
    ),
    Mutation(
        "int8-one-scale-per-batch",
        "captioner/perf.py",
        "scale = torch.maximum(rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True).neg_())",
        "scale = rows.abs().amax().expand(rows.shape[0], 1).clone()",
        ("tests/test_perf.py",),
    ),
    Mutation(
        "checkpoint-unpickles-on-failure",
        "captioner/checkpoint.py",
        '        raise CheckpointError(f"cannot read {folder / WEIGHTS}: {exc}") from exc',
        "        import torch as _t; tensors = _t.load(str(folder / WEIGHTS), weights_only=False)",
        ("tests/test_checkpoint_api.py",),
    ),
    # ---- the model core
    Mutation(
        "beta-gate-removed",
        "captioner/decoder.py",
        "context = torch.sigmoid(self.f_beta(state.h)) * context  # (B, P)",
        "context = context  # (B, P)",
        ATTENTION_TESTS,
    ),
    Mutation(
        "beta-gate-on-new-state",
        "captioner/decoder.py",
        "context = torch.sigmoid(self.f_beta(state.h)) * context  # (B, P)",
        "context = torch.sigmoid(self.f_beta(state.c)) * context  # (B, P)",
        ATTENTION_TESTS,
    ),
    Mutation(
        "doubly-stochastic-over-cells",
        "captioner/xe.py",
        "reg = ((1.0 - alphas.sum(dim=1)) ** 2).mean()",
        "reg = ((1.0 - alphas.sum(dim=2)) ** 2).mean()",
        ("tests/test_attention.py", "tests/test_train.py"),
    ),
    Mutation(
        "doubly-stochastic-dropped",
        "captioner/xe.py",
        "return ce + alpha_c * reg, ce",
        "return ce + 0 * reg, ce",
        ("tests/test_attention.py", "tests/test_train.py"),
    ),
    Mutation("unk-not-masked", "captioner/search.py", 'logp[:, unk_id] = float("-inf")', "pass", SEARCH_TESTS),
    Mutation("start-not-masked", "captioner/search.py", 'logp[:, start_id] = float("-inf")', "pass", SEARCH_TESTS),
    Mutation("pad-not-masked", "captioner/search.py", 'logp[:, pad_id] = float("-inf")', "pass", SEARCH_TESTS),
    Mutation(
        "repeats-not-blocked",
        "captioner/search.py",
        'logp.scatter_(1, prev.unsqueeze(1), float("-inf"))',
        "pass",
        SEARCH_TESTS,
    ),
    Mutation(
        "empty-caption-allowed",
        "captioner/search.py",
        "    if step == 0:\n        logp[:, end_id]",
        "    if step < 0:\n        logp[:, end_id]",
        SEARCH_TESTS,
    ),
    Mutation(
        "exif-orientation-ignored",
        "captioner/images.py",
        "img = ImageOps.exif_transpose(img)",
        "img = img",
        ("tests/test_images.py",),
    ),
    Mutation(
        "scst-baseline-includes-own-sample",
        "captioner/scst.py",
        "baseline = (r.sum(1, keepdim=True) - r) / (samples - 1)",
        "baseline = r.mean(1, keepdim=True)",
        ("tests/test_scst.py",),
    ),
    Mutation(
        "scst-no-baseline",
        "captioner/scst.py",
        "baseline = (r.sum(1, keepdim=True) - r) / (samples - 1)",
        "baseline = torch.zeros_like(r)",
        ("tests/test_scst.py",),
    ),
    Mutation(
        "vocab-threshold-strict",
        "captioner/vocab.py",
        "if n >= min_count",
        "if n > min_count",
        ("tests/test_vocab.py",),
    ),
    Mutation(
        "vocab-alphabetical-order",
        "captioner/vocab.py",
        "key=lambda w: (-counts[w], w)",
        "key=lambda w: w",
        ("tests/test_vocab.py",),
    ),
    Mutation(
        "vocab-unknown-word-dropped",
        "captioner/vocab.py",
        "ids = [self.stoi.get(t, self.unk_id) for t in tokenize(text)]",
        "ids = [self.stoi[t] for t in tokenize(text) if t in self.stoi]",
        ("tests/test_vocab.py",),
    ),
    Mutation(
        "train-resume-forgets-optimizer",
        "captioner/train_setup.py",
        'opt.optimizer.load_state_dict(resume_state["optimizer"])',
        "pass",
        ("tests/test_train.py",),
    ),
    Mutation(
        "train-resume-repeats-epoch",
        "captioner/train_setup.py",
        'start_epoch = int(resume_state["epoch"]) + 1',
        'start_epoch = int(resume_state["epoch"])',
        ("tests/test_train.py",),
    ),
    Mutation(
        "checkpoint-tied-weights-not-recorded",
        "captioner/checkpoint.py",
        "if ptr in seen and v.numel() > 0:",
        "if False:",
        ("tests/test_checkpoint_api.py",),
    ),
    Mutation(
        "checkpoint-newer-format-accepted",
        "captioner/checkpoint.py",
        'if config.get("format_version", 0) > FORMAT_VERSION:',
        "if False:",
        ("tests/test_checkpoint_api.py",),
    ),
    Mutation(
        "checkpoint-fp16-not-upcast",
        "captioner/checkpoint.py",
        "return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}",
        "return tensors",
        ("tests/test_checkpoint_api.py",),
    ),
    # ---- more of the search, training, preprocessing, the batch CLI and the service
    Mutation(
        "finished-beams-not-frozen",
        "captioner/live_rows.py",
        "return torch.where(done.unsqueeze(1), self.idle, logp), new, alpha  # (R, V)",
        "return logp, new, alpha  # (R, V)",
        SEARCH_TESTS,
    ),
    Mutation(
        "beam-length-counts-padding",
        "captioner/search.py",
        "self.lengths = self.lengths.index_select(0, origin) + (~was_done).long()  # (R,)",
        "self.lengths = self.lengths.index_select(0, origin) + 1  # (R,)",
        SEARCH_TESTS,
    ),
    Mutation(
        "label-smoothing-dropped",
        "captioner/xe.py",
        "ce = F.cross_entropy(logits[mask], targets[mask], label_smoothing=label_smoothing)",
        "ce = F.cross_entropy(logits[mask], targets[mask])",
        ("tests/test_training_math.py",),
    ),
    Mutation(
        "lr-warmup-starts-at-zero",
        "captioner/schedule.py",
        "return (step + 1) / warmup",
        "return step / warmup",
        ("tests/test_training_math.py",),
    ),
    Mutation(
        "ddp-not-wrapped",
        "captioner/train_setup.py",
        "model = torch.nn.parallel.DistributedDataParallel(",
        "model = decoder if True else torch.nn.parallel.DistributedDataParallel(",
        ("tests/test_ddp.py",),
    ),
    Mutation(
        "ddp-every-rank-saves",
        "captioner/train_setup.py",
        "main_proc = rank == 0",
        "main_proc = True",
        ("tests/test_ddp.py",),
    ),
    Mutation(
        "preprocess-center-crop",
        "captioner/images.py",
        "img = img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)",
        "img = ImageOps.fit(img, (size, size), Image.BICUBIC)",
        ("tests/test_images.py",),
    ),
    Mutation(
        "preprocess-bgr",
        "captioner/images.py",
        "return arr.permute(2, 0, 1).contiguous()  # (3, S, S)",
        "return arr.permute(2, 0, 1).flip(0).contiguous()  # (3, S, S)",
        ("tests/test_images.py",),
    ),
    Mutation(
        "batch-json-array-not-closed",
        "captioner/outputs.py",
        'self.file.write("\\n]\\n" if self.count else "]\\n")',
        "pass",
        BATCH_TESTS,
    ),
    Mutation(
        "batch-exit-0-despite-failures",
        "captioner/commands/caption.py",
        'return 1 if failed or plan["failed_before"] else 0',
        "return 0",
        BATCH_TESTS,
    ),
    Mutation(
        "too-large-image-answered-400",
        "service/captions.py",
        '"too_large": (413, "too_large")',
        '"too_large": (400, "too_large")',
        SERVICE_TESTS,
    ),
]


def copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files (no venv, caches or data) into ``dest``."""
    listing = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listing):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def check_snippets(mutations: list[Mutation], root: Path) -> list[str]:
    problems = []
    for m in mutations:
        path = root / m.file
        n = path.read_text().count(m.find) if path.exists() else 0
        if n != 1:
            problems.append(f"{m.name}: snippet found {n} times in {m.file} (expected once)")
        problems += [f"{m.name}: no test file {t}" for t in m.tests if not (root / t.split("::")[0]).exists()]
    return problems


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, last lines of output) for pytest on ``tests`` in ``root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env |= {"PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "timeout", time.perf_counter() - start, out[-1500:]
    except BaseException:  # interrupted: leave no test run behind
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    status = "passed" if proc.returncode == 0 else "failed"
    return status, time.perf_counter() - start, out[-1500:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutations (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutation's test run (default 600)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the test files")
    args = parser.parse_args(argv)
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file:28s} {' '.join(m.tests)}")
        return 0

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM too removes the copy and stops pytest
    problems = check_snippets(chosen, REPO)
    if problems:
        print("the mutation list no longer matches the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        probe = subprocess.run(
            [sys.executable, "-c", "import captioner, service; print(captioner.__file__)"],
            cwd=root,
            env=dict(os.environ, PYTHONPATH=str(root)),
            capture_output=True,
            text=True,
        )
        if not probe.stdout.strip().startswith(str(root)):
            print(f"the copy's code is not the one imported: {probe.stdout}{probe.stderr}", file=sys.stderr)
            return 2
        if not args.no_baseline:
            files = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            status, secs, out = run_tests(root, files, args.timeout * 2)
            print(f"baseline (unmutated) {' '.join(files)}: {status} in {secs:.0f} s", flush=True)
            if status != "passed":
                print(out, file=sys.stderr)
                return 2
        rows = []
        for m in chosen:
            path = root / m.file
            original = path.read_text()
            path.write_text(original.replace(m.find, m.replace, 1))
            try:
                status, secs, out = run_tests(root, m.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = "SURVIVED" if status == "passed" else "caught" + (" (timeout)" if status == "timeout" else "")
            rows.append((m.name, verdict, secs))
            print(f"{m.name:40s} {verdict:18s} {secs:6.0f} s", flush=True)
    survived = [name for name, verdict, _ in rows if verdict == "SURVIVED"]
    print(
        f"\n{len(rows) - len(survived)} of {len(rows)} mutations caught"
        + (f"; survived: {', '.join(survived)}" if survived else "")
    )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

"""The real model's size through the whole node on this machine: what one study costs a CPU.

    .venv/bin/python bench/fullsize.py [--model-dir DIR] [--layers N] [--tokens 16] [--json]

1. Makes (or reuses) a random checkpoint in the published format: full size (7.05 B
   parameters, ~14 GB of bf16, `cxrnode model make-random`), or full width with ``--layers N``
   decoder layers. Its answers are noise; its cost is the real shapes'.
2. Measures, in this run, the disk's sequential read of the shards (page cache evicted before
   and after) and the memory bandwidth of a large copy (bytes read + written per second).
3. Starts `cxrnode serve` on embedded defaults (SQLite, embedded broker) with ``CXRNODE_MODEL``
   pointing at it (bf16 weights, one study at a time, greedy, ``--tokens`` new tokens per
   answer: forced lengths, since random weights rarely say EOS), and a dcmtk ``storescp`` as
   the PACS. Once the inference worker has loaded the model, sends one chest radiograph with
   ``storescu`` and waits for the text SR and the Secondary Capture at the PACS.
4. Reads from the inference worker: its peak RSS (``VmHWM``, sampled through the run), its load
   time and its model totals (image-encoder, prefill and decode seconds, prefill tokens, decode
   steps; ``worker.batcher`` logs them).
5. Does the same with int8 weight-only quantization (``CXRNODE_QUANTIZE=int8``, torchao), unless
   ``--no-int8``.

Prints a summary, then one JSON line (only the JSON line with ``--json``). The decode limit is
the bytes a decode step must read (decoder layers, final norm, LM head: ``bytes_per_token``)
over the copy bandwidth; ``decode_vs_limit`` is how far the measured step rate is from it.
``peak_rss_bound_bytes`` is the goal 1.15 x weight bytes + 1 GiB, ``load_vs_disk_read`` the
load time over the disk-read time of the same bytes.

While a node runs, the bench watches the machine: if the memory available drops below 2 GiB it
stops the node and fails, rather than let the kernel's OOM killer choose a victim.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# bench/model.py would shadow the model package: import from the repository root instead
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import dicomgen  # noqa: E402
from services import BIN, Node, free_port, node_env, storescu, wait_for  # noqa: E402

GIB = 1024**3
MIN_AVAILABLE = 2 * GIB
LOADED = re.compile(r"\[[^\]]*?(\d+)\] worker\.batcher: model loaded in ([\d.]+) s")
TOTALS = re.compile(r"\[[^\]]*?(\d+)\] worker\.batcher: model totals (\{.*\})")
REFUSED = re.compile(r"model cannot be loaded: (.*)")


class BenchError(RuntimeError):
    """The run cannot give a figure (the node failed, the machine ran short of memory...)."""


# ------------------------------------------------------------------ the checkpoint
def default_dir(layers: int | None) -> Path:
    root = Path(os.environ.get("CXRNODE_BENCH_MODELS", Path.home() / ".cache" / "cxrnode"))
    return root / ("cxr-llava-v2-random" + (f"-{layers}-layers" if layers else ""))


def ensure_checkpoint(directory: Path, layers: int | None) -> tuple[Path, bool]:
    """(the checkpoint, whether it was made now); reused when its config has the layers."""
    want = layers or 32
    config = directory / "config.json"
    index = directory / "model.safetensors.index.json"
    if config.is_file() and index.is_file():
        llama = json.loads(config.read_text())["llama"]
        shards = set(json.loads(index.read_text())["weight_map"].values())
        if llama["num_hidden_layers"] == want and all((directory / s).is_file() for s in shards):
            return directory, False
    command = [str(BIN / "cxrnode"), "model", "make-random", str(directory), "--size", "full"]
    if layers:
        command += ["--layers", str(layers)]
    subprocess.run(command, check=True, capture_output=True, timeout=3600)
    return directory, True


def shard_files(directory: Path) -> list[Path]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return sorted({directory / f for f in index["weight_map"].values()})


def headers(directory: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) from the shards' JSON headers."""
    out: dict[str, tuple[str, list[int]]] = {}
    for path in shard_files(directory):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            for name, info in json.loads(f.read(n)).items():
                if name != "__metadata__":
                    out[name] = (info["dtype"], info["shape"])
    return out


def bytes_per_token(tensors: dict[str, tuple[str, list[int]]], int8: bool = False) -> int:
    """Bytes one decode step reads: decoder layers, final norm, LM head (bf16 stored; with
    ``int8`` the decoder's linear weights at one byte a value plus a bf16 scale per row)."""
    total = 0
    for name, (_, shape) in tensors.items():
        if not (name.startswith(("llama.layers.", "llama.norm.")) or name == "lm_head.weight"):
            continue
        values = 1
        for d in shape:
            values *= d
        linear = name.startswith("llama.layers.") and name.endswith("_proj.weight")
        total += values + 2 * shape[0] if (int8 and linear) else 2 * values
    return total


# ------------------------------------------------------------------ the machine
def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (written back first), so reads hit the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_seconds(paths: list[Path]) -> tuple[float, int]:
    """Seconds to read the files front to back from a cold cache, and the bytes read."""
    evict(paths)
    buffer = memoryview(bytearray(16 * 1024 * 1024))
    total = 0
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while n := f.readinto(buffer):
                total += n
    seconds = time.perf_counter() - started
    evict(paths)
    return seconds, total


def copy_bandwidth(nbytes: int = GIB, repeats: int = 5) -> float:
    """Bytes/s moved by a large in-memory copy (each copy reads and writes ``nbytes``), with
    torch's threads, as the decoder's matrix-vector products read their weights."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    seconds = time.perf_counter() - started
    del src, dst
    return 2 * nbytes * repeats / seconds


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss(pid: int) -> int | None:
    """``VmHWM`` of a process (its peak resident set, file-backed pages included)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Watch:
    """Samples the group's processes' peak RSS; stops the node if memory runs short."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.peaks: dict[int, int] = {}
        self.short: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        group = os.getpgid(self.node.proc.pid)
        while not self._stop.wait(0.5):
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                with contextlib.suppress(OSError):
                    if os.getpgid(int(entry)) == group:
                        rss = peak_rss(int(entry))
                        if rss is not None:
                            self.peaks[int(entry)] = max(self.peaks.get(int(entry), 0), rss)
            available = mem_available()
            if available < MIN_AVAILABLE:
                self.short = available
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
                return


# ------------------------------------------------------------------ one node run
def run_node(model_dir: Path, work: Path, tokens: int, quantize: str, timeout: float) -> dict:
    """One study through a node with this checkpoint; the inference worker's figures."""
    work.mkdir(parents=True)
    received = work / "pacs"
    received.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "PACS", "-od", str(received), str(pacs_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = node_env(
        work / "node",
        model=str(model_dir),
        model_dtype="bfloat16",
        quantize=quantize,
        temperature="0",
        max_new_tokens=str(tokens),
        batch_size="1",
        destinations=f"PACS@127.0.0.1:{pacs_port}",
        log_level="INFO",
        log_format="text",
    )
    node = Node(work / "node", env)
    started = time.perf_counter()
    try:
        node.start(wait=False)
        with Watch(node) as watch:
            node.wait_ready(timeout=120)

            def loaded() -> re.Match | None:
                log = node.log()
                if refused := REFUSED.search(log):
                    raise BenchError(f"the inference worker refused the model: {refused[1]}")
                if node.proc.poll() is not None or watch.short is not None:
                    raise BenchError(_why(node, watch))
                return LOADED.search(log)

            match = wait_for(loaded, timeout, "the inference worker to load the model", 1.0)
            worker_pid, load_s = int(match[1]), float(match[2])
            ready_s = time.perf_counter() - started
            study = dicomgen.make_chest(work / "study.dcm", seed=1, patient_age="054Y")
            sent = time.perf_counter()
            answer = storescu(node.port, study)
            if answer.returncode != 0:
                raise BenchError(f"storescu failed: {answer.stderr[-500:]}")

            def arrived() -> list[Path]:
                if node.proc.poll() is not None or watch.short is not None:
                    raise BenchError(_why(node, watch))
                files = [p for p in received.iterdir() if p.is_file()]
                return files if len(files) >= 2 else []

            files = wait_for(arrived, timeout, "the SR and the SC at the PACS", 0.5)
            draft_s = time.perf_counter() - sent
            totals = wait_for(lambda: TOTALS.findall(node.log()), 30, "the model totals", 0.5)
            time.sleep(1.0)  # one more sample of the worker's peak RSS
        hwm = max(watch.peaks.get(worker_pid, 0), peak_rss(worker_pid) or 0)
    finally:
        node.stop()
        pacs.terminate()
        pacs.wait(10)
    stats = json.loads(totals[-1][1])
    steps = stats["decode_steps"]
    return {
        "quantize": quantize,
        "peak_rss_bytes": hwm,
        "load_s": load_s,
        "ready_s": ready_s,
        "encode_s": stats["encode_time"],
        "prefill_tokens": stats["prefill_tokens"],
        "prefill_s": stats["prefill_time"],
        "prefill_tok_s": stats["prefill_tokens"] / stats["prefill_time"],
        "decode_steps": steps,
        "decode_s": stats["decode_time"],
        "decode_tok_s": steps / stats["decode_time"] if stats["decode_time"] else None,
        "total_s": draft_s,
        "pacs_files": sorted(_sop_class(p) for p in files),
    }


def _why(node: Node, watch: Watch) -> str:
    if watch.short is not None:
        return (
            f"memory available fell to {watch.short / GIB:.1f} GiB (< {MIN_AVAILABLE / GIB:.0f}"
            " GiB): the node was stopped"
        )
    return f"the node exited with {node.proc.returncode}:\n{node.log()[-3000:]}"


def _sop_class(path: Path) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPClassUID.name)


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="checkpoint to make or reuse")
    ap.add_argument("--layers", type=int, help="full width, this many decoder layers")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per answer (forced)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 run")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per wait")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    directory = (args.model_dir or default_dir(args.layers)).expanduser()
    t = time.perf_counter()
    directory, made = ensure_checkpoint(directory, args.layers)
    make_s = time.perf_counter() - t
    say(f"checkpoint {directory} ({'made' if made else 'reused'} in {make_s:.0f} s)")
    paths = shard_files(directory)
    tensors = headers(directory)
    weight_bytes = sum(p.stat().st_size for p in paths)
    disk_s, read = disk_read_seconds(paths)
    say(f"disk: {read / 1e9:.2f} GB read in {disk_s:.1f} s ({read / disk_s / 1e9:.2f} GB/s)")
    bandwidth = copy_bandwidth()
    say(f"memory: copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    per_token = {"none": bytes_per_token(tensors), "int8": bytes_per_token(tensors, int8=True)}

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cxrnode-fullsize-") as tmp:
        for quantize in ["none"] + ([] if args.no_int8 else ["int8"]):
            say(f"node run, weights {'bf16' if quantize == 'none' else quantize} ...")
            run = run_node(directory, Path(tmp) / quantize, args.tokens, quantize, args.timeout)
            limit = bandwidth / per_token[quantize]
            run |= {
                "bytes_per_token": per_token[quantize],
                "decode_limit_tok_s": limit,
                "decode_vs_limit": limit / run["decode_tok_s"] if run["decode_tok_s"] else None,
            }
            runs[quantize] = run
            say(_summary(quantize, run))
            evict(paths)  # the next run reads from the disk too
    bf16 = runs["none"]
    report: dict[str, Any] = {
        "checkpoint": str(directory),
        "layers": args.layers or 32,
        "tokens_per_answer": args.tokens,
        "made_s": make_s if made else None,
        "weight_bytes": weight_bytes,
        "disk_read_s": disk_s,
        "disk_read_gbps": read / disk_s / 1e9,
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "cpu_threads": os.cpu_count(),
        **{k: v for k, v in bf16.items() if k != "quantize"},
        "peak_rss_bound_bytes": int(1.15 * weight_bytes + GIB),
        "peak_rss_within_bound": bf16["peak_rss_bytes"] <= 1.15 * weight_bytes + GIB,
        "load_vs_disk_read": bf16["load_s"] / disk_s,
    }
    if "int8" in runs:
        report["int8"] = {k: v for k, v in runs["int8"].items() if k != "quantize"}
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return report


def _summary(name: str, r: dict) -> str:
    label = "bf16" if name == "none" else name
    return (
        f"  {label}: peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB, load {r['load_s']:.1f} s, "
        f"encode {r['encode_s']:.1f} s, prefill {r['prefill_tokens']} tokens in "
        f"{r['prefill_s']:.1f} s, decode {r['decode_tok_s']:.2f} tok/s (limit "
        f"{r['decode_limit_tok_s']:.2f}), draft at the PACS {r['total_s']:.1f} s after sending"
    )


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"bench/fullsize.py: {exc}")

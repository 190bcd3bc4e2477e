"""The fast backend: the whole decoder as one onnxruntime session, one `run` per forward call.

At load the graph is built from the pack's header (runtime/onnx_graph.py, a few ms) and the
weights are handed to onnxruntime as OrtValues over the memory-mapped file: no copy is made
by llmpack. onnxruntime then pre-packs the matrices into its kernels' own layouts (that copy
is the one the CPU kernels compute from); meanwhile the mapped pages it has read are released
from this process (madvise DONTNEED), so resident memory holds one copy of the weights, not two. The KV cache lives in numpy arrays bound as both past and present of
GroupQueryAttention (one buffer, updated in place), grown by doubling.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from llmpack.formats.errors import LlmpackError
from llmpack.formats.reader import Pack

from .onnx_graph import build_decoder

DEFAULT_ACCURACY_LEVEL = 4  # int8 activations in MatMulNBits (measured: docs/onnxruntime.md)
GRAPH_VERSION = 1  # bump when the graph built for the same pack changes (invalidates saved sessions)
INITIAL_CAPACITY = 256  # KV cache positions allocated by the first forward; doubles as needed


def next_capacity(need: int, current: int, limit: int, start: int | None = None) -> int:
    """KV capacity growth: doubling from `start`, never past the context length."""
    cap = max(current, start or INITIAL_CAPACITY, 1)
    while cap < need:
        cap *= 2
    return max(min(cap, limit), need)


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings counted once)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as fh:
                cores.add(fh.read().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


class OrtKVCache:
    """Per-layer K/V numpy buffers (1, Hk, capacity, hd); `length` positions are valid.

    Growing swaps in whole new lists at once, so an interrupt (Ctrl-C in chat) never leaves
    a half-grown cache behind.
    """

    def __init__(self, backend: "OrtBackend"):
        self.backend = backend
        self.length = 0
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self._binding = None  # io binding with these buffers bound as past and present
        self._rope = {}  # RoPE cos/sin tables for `capacity` positions, bound with them
        self._step = None  # one-token input/output buffers bound in _binding (OrtBackend._step)
        self._bound_logits = None  # id of the logits buffer bound as output in _binding

    def reserve(self, total: int):
        if total <= self.capacity:
            return
        cap = next_capacity(total, self.capacity, self.backend.context_length)
        grown = []
        for store in (self.keys, self.values):
            new = []
            for i, ly in enumerate(self.backend.layer_shapes):
                a = np.zeros((1, ly.n_kv, cap, ly.head_dim), np.float32)
                if self.length:
                    a[:, :, : self.length] = store[i][:, :, : self.length]
                new.append(a)
            grown.append(new)
        self.keys, self.values, self.capacity = grown[0], grown[1], cap
        self._binding = self._step = self._bound_logits = None

    def truncate(self, length: int):
        """Forget positions >= length (GroupQueryAttention masks everything past seqlens_k)."""
        self.length = min(self.length, length)


class OrtBackend:
    """`cache_dir` (default: $LLMPACK_ORT_CACHE, unset = off): keep onnxruntime's optimized graph
    with its pre-packed weights there, keyed by the pack's header (which holds every tensor's
    checksum), the options, the onnxruntime version and the CPU. A later load maps the packed
    weights from that file instead of packing again (faster load; file-backed, shareable memory)
    at the cost of disk space about twice a q4 pack."""

    name = "onnxruntime"

    def __init__(self, pack: Pack, threads: int | None = None, accuracy_level: int | None = None,
                 fuse: bool = True, release_pages: bool = True, cache_dir=None, spinning: bool | None = None):
        import onnxruntime as ort

        self.ort = ort
        self.pack = pack
        m = pack.header["model"]
        self.m = m
        self.threads = threads or physical_cores()
        self.accuracy_level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
        t0 = time.perf_counter()
        self.graph = build_decoder(pack, accuracy_level=self.accuracy_level, fuse=fuse)  # validates the header
        self.context_length = m["context_length"]
        self.vocab_size = self.graph.vocab_size
        self.layer_shapes = self.graph.layers
        self.build_seconds = time.perf_counter() - t0

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if spinning is not None:  # worker threads busy-wait between kernels (onnxruntime's default: on)
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        cache_dir = cache_dir if cache_dir is not None else os.environ.get("LLMPACK_ORT_CACHE") or None
        cached = _cache_path(cache_dir, pack, self.accuracy_level, fuse, ort.__version__) if cache_dir else None
        self.cache_hit = bool(cached and (cached / "model.onnx").is_file())
        try:
            if self.cache_hit:
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # saved optimized
                self.session = ort.InferenceSession(str(cached / "model.onnx"), so,
                                                    providers=["CPUExecutionProvider"])
            else:
                self.session = self._create(so, cached, release_pages)
        except LlmpackError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types
            raise LlmpackError(f"onnxruntime cannot build this model's graph: {e}".splitlines()[0]) from e
        self.session_seconds = time.perf_counter() - t0 - self.build_seconds
        self._logits_pool: dict[int, list] = {}  # id -> [buffer, OrtValue over it, free refcount]

    def _create(self, so, cached, release_pages):
        """A session over the mapped weights (pre-packed by onnxruntime now); saved if `cached`."""
        ort = self.ort
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model = self.graph.model(lambda name, arr: {"location": "llmpack-mapped", "offset": 0,
                                                    "length": arr.nbytes})
        names, values = [], []
        for name, (arr, elem) in self.graph.weights.items():
            names.append(name)
            values.append(ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, elem))
        so.add_external_initializers(names, values)
        self._initializer_values = values  # onnxruntime reads these buffers for the session's life
        tmp = None
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
            except OSError as e:  # an unwritable cache folder only costs the speed-up
                print(f"llmpack: note: cannot save the session in {cached.parent} ({e.strerror})", file=sys.stderr)
        if tmp is not None:
            so.optimized_model_filepath = str(tmp / "model.onnx")
            so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            with _PageReleaser(self.pack if release_pages else None):
                session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            if tmp is not None:
                try:
                    os.replace(tmp, cached)  # atomic: a concurrent load sees all of it or nothing
                    tmp = None
                except OSError:  # another process saved the same key first
                    pass
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return session

    def new_cache(self) -> OrtKVCache:
        return OrtKVCache(self)

    def forward(self, ids, cache: OrtKVCache, last_only: bool = False) -> np.ndarray:
        """Run T new tokens after the cached ones; returns logits (T, V) or (1, V) if last_only."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        T, start = ids.shape[1], cache.length
        if T == 0:
            raise ValueError("forward needs at least one token")
        if start + T > self.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's context of {self.context_length}")
        cache.reserve(start + T)
        b = cache._binding
        if b is None:
            b = self.session.io_binding()
            cache._rope = self.graph.rope_arrays(self.pack, cache.capacity)  # kept alive with the binding
            for name, table in cache._rope.items():
                b.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(table))
            for i in range(len(self.layer_shapes)):
                for kind, store in (("key", cache.keys), ("value", cache.values)):
                    ov = self.ort.OrtValue.ortvalue_from_numpy(store[i])
                    b.bind_ortvalue_input(f"past_key_values.{i}.{kind}", ov)
                    b.bind_ortvalue_output(f"present.{i}.{kind}", ov)
            cache._binding = b
        if T == 1:
            return self._step(ids[0, 0], cache, b)
        n_out = 1 if last_only else T
        logits = np.empty((1, n_out, self.vocab_size), np.float32)
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("position_ids", np.arange(start, start + T, dtype=np.int64).reshape(1, T))
        b.bind_cpu_input("seqlens_k", np.array([start + T - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(start + T, np.int32))
        b.bind_cpu_input("logits_start", np.array([T - n_out], np.int64))
        b.bind_output("logits", "cpu", element_type=np.float32, shape=logits.shape,
                      buffer_ptr=logits.ctypes.data)
        cache._step = cache._bound_logits = None  # the one-token buffers must be bound again
        self.session.run_with_iobinding(b)
        cache.length = start + T
        return logits[0]

    def _step(self, token, cache: OrtKVCache, b) -> np.ndarray:
        """One token: the small inputs live in buffers bound once per cache and rewritten in
        place, and the logits go straight into a recycled output buffer, so a decode step costs
        one run, at most one binding call and no page faults (a fresh 0.6 MB array each step
        costs ~0.4 ms of page faults on a 150k vocabulary)."""
        st = cache._step
        if st is None:
            st = cache._step = {"input_ids": np.zeros((1, 1), np.int64), "position_ids": np.zeros((1, 1), np.int64),
                                "seqlens_k": np.zeros(1, np.int32), "total_sequence_length": np.zeros((), np.int32),
                                "logits_start": np.zeros(1, np.int64)}
            for name, arr in st.items():
                b.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(arr))
            cache._bound_logits = None
        pos = cache.length
        st["input_ids"][0, 0] = token
        st["position_ids"][0, 0] = pos
        st["seqlens_k"][0] = pos
        st["total_sequence_length"][()] = pos + 1
        out = self._free_logits_buffer()
        if cache._bound_logits != id(out):  # an id, not a reference: that would pin the buffer
            b.bind_ortvalue_output("logits", self._logits_pool[id(out)][1])
            cache._bound_logits = id(out)
        self.session.run_with_iobinding(b)
        cache.length = pos + 1
        return out[0]

    def _free_logits_buffer(self) -> np.ndarray:
        """A (1, 1, V) buffer no caller holds any more (its reference count is back to the pool's
        own), or a new one; the pool keeps at most 4."""
        pool = self._logits_pool
        for buf, ov, base in pool.values():
            if sys.getrefcount(buf) <= base:
                return buf
        buf = np.empty((1, 1, self.vocab_size), np.float32)
        if len(pool) < 4:
            entry = [buf, self.ort.OrtValue.ortvalue_from_numpy(buf), 0]
            pool[id(buf)] = entry
            entry[2] = sys.getrefcount(buf)  # the pool's references (+ a local and the argument)
            return buf
        pool.pop(next(iter(pool)))  # all held by callers: replace the oldest entry
        return self._free_logits_buffer()

def _cache_path(cache_dir, pack: Pack, accuracy_level: int, fuse: bool, ort_version: str) -> Path:
    """Folder of the saved session for this pack + options + onnxruntime + CPU (the packed layouts
    depend on the instruction set)."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = "".join(sorted({line for line in fh if line.startswith(("model name", "flags"))}))
    except OSError:
        import platform

        cpu = platform.processor() or platform.machine()
    h = hashlib.sha256(json.dumps(pack.header, sort_keys=True).encode())  # holds every part's crc32
    h.update(json.dumps([accuracy_level, fuse, ort_version, GRAPH_VERSION, cpu]).encode())
    return Path(cache_dir) / h.hexdigest()[:32]


class _PageReleaser:
    """While onnxruntime pre-packs the weights, keep dropping the mapped file's pages from this
    process (madvise DONTNEED every 50 ms), and once more at the end.

    onnxruntime computes from its own pre-packed copies, so without this the process would hold
    the file's pages *and* the packed copy (peak ~file + packed). The mapping is shared and
    read-only: a dropped page is only re-read from the page cache if touched again (embedding
    rows, norms, which onnxruntime reads in place)."""

    def __init__(self, pack: Pack | None, interval: float = 0.05):
        self.mm = getattr(pack, "_mm", None) if pack is not None else None
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None

    def _drop(self):
        try:
            self.mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError, AttributeError):
            pass

    def _run(self):
        while not self._stop.wait(self.interval):
            self._drop()

    def __enter__(self):
        if self.mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._thread = threading.Thread(target=self._run, name="llmpack-release-pages", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._drop()
        return False

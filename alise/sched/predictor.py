"""Output-length predictor: retrieval over past requests, with an MLP fallback (ALISE, section on prediction).

ALISE estimates how many tokens a request will generate before running it, so the scheduler can serve the
shortest estimated work first. The estimator here is the paper's retrieval-based predictor:

1. Every finished request is remembered: (embedding of its prompt, its true output length). The embeddings are
   unit vectors, so cosine similarity is one matrix-vector product against the store.
2. A new prompt is embedded and its ``k`` nearest past prompts are found. If the best of them is at least
   ``threshold`` similar, the prediction is the similarity-weighted mean length of the neighbours above the
   threshold: someone asked (nearly) this before, and answers to the same question have similar lengths.
3. Otherwise a small MLP, trained on the whole store to regress log(length) from the embedding, answers. It is
   refit every ``refit_every`` observations (warm-started, a fixed number of minibatch steps, so a refit costs
   tens of milliseconds however large the store is).

When a request outlives its prediction, ``predict_remaining`` re-estimates: of the similar neighbours, only
those that ran *longer* than what the request has produced so far still describe it, so the estimate is their
similarity-weighted mean length minus ``generated`` (the conditional length given survival).

Our choices where the paper is silent (each measured; the figures are in docs/design.md, "Measured choices"):

- ``k = 5`` neighbours, trusted at cosine ``threshold = 0.5``: lowering it from 0.85 ordered held-out prompts
  much better; the MLP answers prompts unlike anything seen, as in the paper. The threshold belongs to the
  embedder: retune it (``python -m alise.bench.predictor --grid``) when plugging in another one.
- MLP: d -> 64 (GELU) -> 1 on standardized log length (the error is relative, which is what ordering needs),
  AdamW, 100 minibatch steps per refit, warm-started, refit every 32 observations, on one CPU thread.
- Cold start: an empty store predicts ``DEFAULT_OUTPUT_LEN = 140`` tokens (between the paper's datasets);
  with fewer than ``MIN_FIT`` observations and no similar neighbour, their running mean.
- ``predict_remaining`` looks at ``4 k`` neighbours (many are filtered out for having ended earlier); without a
  similar one that ran longer, the nearest ones that did, however similar; else ``REMAINING_FRACTION *
  generated``. The result is never below 1.
- The store keeps the latest ``max_history = 10000`` requests (a search is one matrix-vector product).

The embedder is pluggable: ``LengthPredictor(embed=f)`` with ``f(list[str]) -> np.ndarray [n, d]`` of
L2-normalized rows. The engine's default (``EngineConfig.embedder="model"``) is the served model's mean token
embedding (``alise.sched.encoder.TokenEmbeddingMean``); ``"minilm"`` is all-MiniLM-L6-v2
(``alise.sched.encoder.MiniLM``), the paper's kind of encoder, which a ``LengthPredictor`` built without
``embed`` loads on first use. The embedder dominates the cost of a prediction. Embeddings of recently seen
prompts are kept here, in one LRU cache keyed by the prompt (text, or the tuple of token ids), so ``predict``
at arrival and ``predict_remaining`` later embed the prompt once; ``observe`` at the end reuses it too.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from alise.sched.encoder import torch_threads

DEFAULT_OUTPUT_LEN = 140   # cold-start prediction (tokens): geometric mean of Alpaca's ~58 and ShareGPT's ~338
MIN_FIT = 16               # observations before the MLP is trained; below, the running mean is the fallback
REMAINING_FRACTION = 0.5   # predict_remaining's last resort: this fraction of what was generated so far

Prompt = str | Sequence[int]
Embedder = Callable[[list[str]], np.ndarray]


class _MLP(nn.Module):
    """embedding [n, d] -> standardized log length [n]."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class LengthPredictor:
    """Predicts a request's output length (tokens) from its prompt; learns online from finished requests.

    ``embed``: ``f(list[str]) -> np.ndarray [n, d]``, L2-normalized rows; None means MiniLM (loaded lazily;
    the engine passes its own embedder, by default the served model's mean token embedding).
    ``decode``: turns a prompt given as token ids into text for the embedder (``tokenizer.decode``); needed
    only if prompts arrive as ids.
    ``k``, ``threshold``: neighbours consulted and the cosine similarity they need to be trusted.
    ``hidden``, ``refit_every``, ``fit_steps``: MLP width, how often it is refit, minibatch steps per refit.
    ``max_history``: the store keeps the most recent this many observations.
    ``cache_size``: prompts whose embedding is kept (LRU): the one embedding cache (embedders keep none).
    """

    def __init__(self, embed: Embedder | None = None, decode: Callable[[list[int]], str] | None = None, *,
                 k: int = 5, threshold: float = 0.5, hidden: int = 64, refit_every: int = 32,
                 fit_steps: int = 100, batch_size: int = 256, lr: float = 3e-3, weight_decay: float = 1e-4,
                 default_len: int = DEFAULT_OUTPUT_LEN, max_history: int = 10_000, cache_size: int = 4096,
                 seed: int = 0):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number (a cosine similarity; > 1 disables retrieval), "
                             f"got {threshold!r}")
        if hidden < 1 or refit_every < 1 or fit_steps < 0 or batch_size < 1 or max_history < 1:
            raise ValueError("hidden, refit_every, batch_size and max_history must be >= 1, fit_steps >= 0")
        if default_len < 1:
            raise ValueError(f"default_len must be >= 1, got {default_len}")
        self._embed_fn = embed
        self.decode = decode
        self.k, self.threshold = k, threshold
        self.hidden, self.refit_every, self.fit_steps, self.batch_size = hidden, refit_every, fit_steps, batch_size
        self.lr, self.weight_decay = lr, weight_decay
        self.default_len, self.max_history, self.cache_size = default_len, max_history, cache_size
        self._gen = torch.Generator().manual_seed(seed)
        # the store: rows [0, n) of _emb / _len are live; prompts kept for save_history
        self._emb: np.ndarray | None = None   # [capacity, d] float32, unit rows
        self._len = np.zeros(0, dtype=np.int64)  # [capacity]
        self._prompts: list[str] = []
        self.n = 0
        self._mlp: _MLP | None = None
        self._mu, self._sd = 0.0, 1.0         # log-length standardization of the last fit
        self._since_fit = 0
        self._cache: OrderedDict[object, np.ndarray] = OrderedDict()

    # -- embedding ------------------------------------------------------------------------------------------

    @property
    def embed(self) -> Embedder:
        if self._embed_fn is None:
            from alise.sched.encoder import MiniLM

            self._embed_fn = MiniLM.load()
        return self._embed_fn

    @staticmethod
    def _key(prompt: Prompt) -> object:
        """The cache key: the text itself, or the tuple of token ids."""
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return tuple(int(t) for t in prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _text(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if self.decode is None:
            raise ValueError("prompt is a list of token ids but the predictor was built without decode=")
        return self.decode(list(int(t) for t in prompt))

    def embed_prompts(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """[n, d] float32 unit rows, through the LRU cache; misses are embedded in one batch."""
        keys = [self._key(p) for p in prompts]
        rows: list[np.ndarray | None] = []
        miss: dict[object, tuple[int, Prompt]] = {}  # key -> (row in the batch to embed, the prompt)
        for key, p in zip(keys, prompts):
            e = self._cache.get(key)
            if e is not None:
                self._cache.move_to_end(key)
            elif key not in miss:
                miss[key] = (len(miss), p)
            rows.append(e)
        if miss:
            texts = [self._text(p) for _, p in miss.values()]
            new = np.asarray(self.embed(texts), dtype=np.float32)
            if new.ndim != 2 or new.shape[0] != len(texts):
                raise ValueError(f"embed returned shape {new.shape} for {len(texts)} texts; expected [n, d]")
            for key, (i, _) in miss.items():
                self._remember(key, new[i])
            rows = [r if r is not None else new[miss[key][0]] for r, key in zip(rows, keys)]
        return np.stack(rows) if rows else np.zeros((0, self._dim() or 1), dtype=np.float32)

    def clear_cache(self) -> None:
        """Forget the cached prompt embeddings (the store is kept)."""
        self._cache.clear()

    def _remember(self, key: object, e: np.ndarray) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = e
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _dim(self) -> int | None:
        return None if self._emb is None else self._emb.shape[1]

    # -- the store ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.n

    def observe(self, prompt: Prompt, output_len: int) -> None:
        """Remember a finished request: its prompt and how many tokens it generated (0 is stored as 1)."""
        self.observe_many([prompt], [output_len])

    def observe_many(self, prompts: Sequence[Prompt], output_lens: Sequence[int]) -> None:
        """Remember many finished requests at once (one embedding batch); refits the MLP when due."""
        if len(prompts) != len(output_lens):
            raise ValueError(f"{len(prompts)} prompts but {len(output_lens)} output lengths")
        lens = []
        for n in output_lens:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"output_len must be an int >= 0, got {n!r}")
            lens.append(max(1, int(n)))
        if not lens:
            return
        emb = self.embed_prompts(prompts)
        texts = [p if isinstance(p, str) else (self.decode(list(p)) if self.decode else None) for p in prompts]
        self._append(emb, np.asarray(lens, dtype=np.int64), texts)
        self._since_fit += len(lens)
        if self.n >= MIN_FIT and (self._mlp is None or self._since_fit >= self.refit_every):
            self.fit()

    def _append(self, emb: np.ndarray, lens: np.ndarray, texts: list[str | None]) -> None:
        if self._emb is None:
            self._emb = np.zeros((0, emb.shape[1]), dtype=np.float32)
        if emb.shape[1] != self._emb.shape[1]:
            raise ValueError(f"embedding width {emb.shape[1]} differs from the store's {self._emb.shape[1]}")
        need = self.n + len(lens)
        if need > self._emb.shape[0]:  # grow by doubling
            cap = max(need, 64, 2 * self._emb.shape[0])
            emb_new, len_new = np.zeros((cap, emb.shape[1]), np.float32), np.zeros(cap, np.int64)
            emb_new[:self.n], len_new[:self.n] = self._emb[:self.n], self._len[:self.n]
            self._emb, self._len = emb_new, len_new
        self._emb[self.n:need] = emb
        self._len[self.n:need] = lens
        self._prompts.extend(t if t is not None else "" for t in texts)
        self.n = need
        if self.n > self.max_history:  # forget the oldest
            drop = self.n - self.max_history
            self._emb[:self.max_history] = self._emb[drop:self.n]
            self._len[:self.max_history] = self._len[drop:self.n]
            del self._prompts[:drop]
            self.n = self.max_history

    def snapshot(self) -> dict:
        """What the predictor has learned (store, MLP, refit counter, random state), copied; not the embedder or
        its cache. ``restore`` puts it back: a benchmark replaying the same prompts at several rates starts every
        run from the same knowledge, instead of retrieving the true lengths the previous run taught it."""
        return {"emb": None if self._emb is None else self._emb[:self.n].copy(), "len": self._len[:self.n].copy(),
                "prompts": list(self._prompts), "n": self.n, "since_fit": self._since_fit, "mu": self._mu,
                "sd": self._sd, "gen": self._gen.get_state(),
                "mlp": None if self._mlp is None else {k: v.clone() for k, v in self._mlp.state_dict().items()}}

    def restore(self, snap: dict) -> None:
        """Back to a ``snapshot`` of this predictor."""
        self._emb = None if snap["emb"] is None else snap["emb"].copy()
        self._len, self._prompts, self.n = snap["len"].copy(), list(snap["prompts"]), snap["n"]
        self._since_fit, self._mu, self._sd = snap["since_fit"], snap["mu"], snap["sd"]
        self._gen.set_state(snap["gen"])
        if snap["mlp"] is None:
            self._mlp = None
        else:
            if self._mlp is None:
                first = snap["mlp"]["net.0.weight"]
                self._mlp = _MLP(first.shape[1], first.shape[0])
            self._mlp.load_state_dict(snap["mlp"])
            self._mlp.eval()

    @property
    def lengths(self) -> np.ndarray:
        """Output lengths in the store, oldest first."""
        return self._len[:self.n].copy()

    # -- the MLP --------------------------------------------------------------------------------------------

    def fit(self) -> None:
        """(Re)fit the MLP on the store: log length, standardized; warm-started from the previous fit."""
        self._since_fit = 0
        if self.n < 2:
            return
        x = torch.from_numpy(self._emb[:self.n])                        # [n, d]
        y = torch.from_numpy(np.log(self._len[:self.n]).astype(np.float32))
        self._mu, self._sd = float(y.mean()), float(y.std().clamp(min=1e-3))
        y = (y - self._mu) / self._sd                                  # [n]
        if self._mlp is None:
            with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
                torch.manual_seed(int(torch.randint(2**31, (), generator=self._gen)))
                self._mlp = _MLP(x.shape[1], self.hidden)
        mlp = self._mlp.train()
        params = list(mlp.parameters())
        m1 = [torch.zeros_like(w) for w in params]  # AdamW moments, written out: torch.optim's first step
        m2 = [torch.zeros_like(w) for w in params]  # imports torch._dynamo, seconds we do not want mid-serving
        b1, b2, eps = 0.9, 0.999, 1e-8
        b = min(self.batch_size, self.n)
        with torch_threads(1):
            for step in range(1, self.fit_steps + 1):
                idx = torch.randint(self.n, (b,), generator=self._gen)
                loss = ((mlp(x[idx]) - y[idx]) ** 2).mean()
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for w, g, m, v in zip(params, grads, m1, m2):
                        m.lerp_(g, 1 - b1)
                        v.mul_(b2).addcmul_(g, g, value=1 - b2)
                        w.mul_(1 - self.lr * self.weight_decay)
                        w.addcdiv_(m / (1 - b1 ** step), (v / (1 - b2 ** step)).sqrt_().add_(eps), value=-self.lr)
        mlp.eval()

    def _mlp_predict(self, emb: np.ndarray) -> np.ndarray:
        with torch.no_grad(), torch_threads(1):
            z = self._mlp(torch.from_numpy(emb)).numpy()
        return np.exp(z * self._sd + self._mu)

    # -- prediction -----------------------------------------------------------------------------------------

    def _neighbours(self, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k store rows per query: (similarities [q, k'], indices [q, k']), best first; k' = min(k, n)."""
        # [q, n]; torch on one thread: numpy's q @ E.T takes a threaded BLAS GEMM path, 10x slower here
        with torch_threads(1):
            sims = (torch.from_numpy(np.ascontiguousarray(emb)) @ torch.from_numpy(self._emb[:self.n]).T).numpy()
        k = min(k, self.n)
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < self.n else np.tile(np.arange(self.n), (len(emb), 1))
        s = np.take_along_axis(sims, idx, axis=1)
        order = np.argsort(-s, axis=1, kind="stable")
        return np.take_along_axis(s, order, axis=1), np.take_along_axis(idx, order, axis=1)

    def _fallback(self, emb: np.ndarray) -> np.ndarray:
        if self._mlp is not None:
            return self._mlp_predict(emb)
        if self.n > 0:
            return np.full(len(emb), float(self._len[:self.n].mean()))
        return np.full(len(emb), float(self.default_len))

    def predict_embedded(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw (unclamped, float) predictions for embeddings [q, d], and whether each came from retrieval."""
        out = self._fallback(emb)
        hit = np.zeros(len(emb), dtype=bool)
        if self.n == 0:
            return out, hit
        s, idx = self._neighbours(emb, self.k)
        ok = s >= self.threshold                                       # [q, k]
        hit = ok[:, 0]
        w = np.where(ok, np.maximum(s, 1e-6), 0.0)
        num = (w * self._len[idx]).sum(1)
        den = w.sum(1)
        out = np.where(hit, num / np.maximum(den, 1e-12), out)
        return out, hit

    def predict(self, prompt: Prompt, max_tokens: int | None = None) -> int:
        """Predicted output length (tokens) of a new request, in [1, max_tokens]."""
        return self.predict_many([prompt], max_tokens)[0]

    def predict_many(self, prompts: Sequence[Prompt], max_tokens: int | None = None) -> list[int]:
        """``predict`` for a batch of prompts (one embedding batch, one store search)."""
        _check_max_tokens(max_tokens)
        if not prompts:
            return []
        raw, _ = self.predict_embedded(self.embed_prompts(prompts))
        return [clamp_length(v, 1, max_tokens) for v in raw]

    def predict_remaining(self, prompt: Prompt, generated: int, max_tokens: int | None = None) -> int:
        """How many more tokens a request that has already generated ``generated`` tokens will produce (>= 1).

        Over the ``4 k`` nearest past requests: the similarity-weighted mean length of those at least
        ``threshold`` similar that ran longer than ``generated``, minus ``generated``. Without such a
        neighbour: the MLP's prediction minus ``generated`` if no neighbour is similar and that is still
        positive; else the same weighted mean over the ``4 k`` nearest that ran longer, however similar; else
        ``REMAINING_FRACTION * generated``.
        Clamped to ``max_tokens - generated`` when max_tokens is given.
        """
        _check_max_tokens(max_tokens)
        if isinstance(generated, bool) or not isinstance(generated, (int, np.integer)) or generated < 0:
            raise ValueError(f"generated must be an int >= 0, got {generated!r}")
        g = int(generated)
        hi = None if max_tokens is None else max(1, max_tokens - g)
        emb = self.embed_prompts([prompt])
        est = None
        if self.n > 0:
            s, idx = self._neighbours(emb, max(self.k, 4 * self.k))
            s, lens = s[0], self._len[idx[0]]
            keep = (s >= self.threshold) & (lens > g)
            if keep.any():  # similar requests that ran longer than this one has so far
                w = np.maximum(s[keep], 1e-6)
                est = float((w * lens[keep]).sum() / w.sum()) - g
            else:
                raw, _ = self.predict_embedded(emb)
                if raw[0] > g and not s[0] >= self.threshold:
                    est = float(raw[0]) - g  # no similar neighbour: the MLP's estimate still stands
                elif (lens > g).any():  # the nearest requests that ran longer, however similar
                    w = np.maximum(s[lens > g], 1e-6)
                    est = float((w * lens[lens > g]).sum() / w.sum()) - g
        elif self.default_len > g:
            est = float(self.default_len - g)
        if est is None:
            est = REMAINING_FRACTION * g
        return clamp_length(est, 1, hi)

    # -- history files ------------------------------------------------------------------------------------

    def load_history(self, path: str | Path, batch_size: int = 256, progress: bool | None = None) -> int:
        """Add JSON Lines records ``{"prompt": str, "output_len": int}`` to the store; returns how many.

        The whole file is validated first: a bad line raises ValueError naming its line number, and nothing
        is added. Embedding runs in batches (a tqdm bar for files over 1000 records unless progress=False);
        the MLP is fit once at the end.
        """
        path = Path(path)
        prompts, lens = [], []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                    raise ValueError(f"{path}: line {lineno}: expected an object with a string \"prompt\"")
                n = rec.get("output_len")
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise ValueError(f"{path}: line {lineno}: \"output_len\" must be an int >= 0, got {n!r}")
                prompts.append(rec["prompt"])
                lens.append(max(1, n))
        if progress is None:
            progress = len(prompts) > 1000
        starts = range(0, len(prompts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"embedding {path.name}", unit="batch")
        for s in starts:
            chunk = prompts[s:s + batch_size]
            self._append(self.embed_prompts(chunk), np.asarray(lens[s:s + batch_size], np.int64), chunk)
        if self.n >= MIN_FIT:
            self.fit()
        return len(prompts)

    def save_history(self, path: str | Path) -> None:
        """Write the store as JSON Lines ``{"prompt", "output_len"}`` (prompts given as ids are saved as "")."""
        with Path(path).open("w", encoding="utf-8") as f:
            for p, n in zip(self._prompts, self._len[:self.n]):
                f.write(json.dumps({"prompt": p, "output_len": int(n)}) + "\n")


def _check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer))
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens must be an int >= 1 or None, got {max_tokens!r}")


def clamp_length(v: float, lo: int, hi: int | None) -> int:
    v = int(round(float(v))) if math.isfinite(v) else lo
    v = max(lo, v)
    return min(v, hi) if hi is not None else v

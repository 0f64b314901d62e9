"""Model runner: owns the model and the KV pool, turns a scheduled batch into one forward pass and samples.

``execute`` is three steps: ``_prepare`` (the flat batch and its ``AttentionMetadata``), ``_forward`` (the
compiled decode graph of ``alise/cpu.py``, or the eager model) and ``_sample``. Swaps go through
``alise/swap.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alise import kernels
from alise.cpu import CompiledDecode
from alise.kernels import AttentionMetadata
from alise.model import Llama
from alise.sampling import sample
from alise.sched.request import Request
from alise.sched.scheduler import ScheduledBatch
from alise.swap import KVSwap

GiB = 1 << 30
DEFAULT_CPU_KV_GB = 1.0


@dataclass
class StepResult:
    sampled: dict[int, int]                       # id(request) -> new token, for requests that finished their pending tokens
    prompt_logprobs: dict[int, list[float]]       # id(request) -> log-probs of prompt tokens scored this step
    compiled_now: bool = False                    # the step's time includes compiling the decode graph


@dataclass
class StepInputs:
    """One step's flat batch: each new token of each request is one row of the model's ``(T, ...)`` input."""

    input_ids: torch.Tensor         # (T,) int64; T counts a compiled step's padding rows
    positions: torch.Tensor         # (T,) int64
    meta: AttentionMetadata
    num_rows: int                   # the real rows
    compiled: bool                  # a decode step (every row samples its request's next token) for the graph
    logit_rows: list[int]           # the rows whose logits the step needs, in order
    sample_of: list[tuple[Request, int]]              # request, its row of the logits: sample the next token
    score_of: list[tuple[Request, int, list[int]]]    # request, its first row of the logits, prompt tokens scored


class ModelRunner:
    def __init__(self, model: Llama, *, kv_dtype: str, block_size: int, num_blocks: int | None,
                 kv_cache_memory_gb: float | None, backend: str, device: torch.device, swap_kv_dtype: str = "auto",
                 compile: bool = False):
        self.model, self.device = model, device
        self.backend = kernels.get_backend(backend, device)    # resolved once: every step's metadata carries it
        cfg = model.config
        self.num_kv_heads, self.head_dim, self.block_size = cfg.num_key_value_heads, cfg.head_dim, block_size
        self.kv_dtype = kv_dtype
        self.bytes_per_token = cfg.num_hidden_layers * kernels.bytes_per_token(kv_dtype, self.num_kv_heads, self.head_dim)
        if num_blocks is None:
            if kv_cache_memory_gb is not None:
                budget = kv_cache_memory_gb * GiB
            elif device.type == "cuda":  # nano-vllm's sizing: what is free after the weights, with a margin
                budget = 0.9 * torch.cuda.mem_get_info(device)[0]
            else:
                budget = DEFAULT_CPU_KV_GB * GiB
            num_blocks = max(int(budget // (self.bytes_per_token * block_size)), 1)
        self.num_blocks = num_blocks
        # compiled decode steps get one more block than the allocator hands out: the padding rows' page
        self.caches = [kernels.allocate_layer_cache(num_blocks=num_blocks + int(compile), block_size=block_size,
                                                    num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                                    kv_dtype=kv_dtype, device=device)
                       for _ in range(cfg.num_hidden_layers)]
        self.swap = KVSwap(self.caches, kv_dtype=kv_dtype, swap_kv_dtype=swap_kv_dtype,
                           num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, device=device)
        self.compiled_decode = (CompiledDecode(model, self.caches, null_block=num_blocks, block_size=block_size)
                                if compile else None)

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        """Carry out the batch's swaps, run its requests' new tokens through the model, sample."""
        for request, blocks in batch.swap_out:    # reads blocks freed this step: before anything writes them
            request.swapped_kv = self.swap.copy_out(blocks)
        for request, blocks in batch.swap_in:
            self.swap.copy_in(request.swapped_kv, blocks)
            request.swapped_kv = None
        if not batch.requests:
            return StepResult({}, {})
        step = self._prepare(batch)
        compiled_now = step.compiled and self.compiled_decode.compiles(step.num_rows)
        logits, greedy_tokens = self._forward(step)
        if logits is None:
            return StepResult({}, {})
        return self._sample(step, logits, greedy_tokens, compiled_now)

    def _prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The step's rows (each request's new tokens, in batch order), their metadata, and the logits rows that
        sampling and prompt scoring read."""
        input_ids, positions, slots, query_start, seq_lens = [], [], [], [0], []
        logit_rows, sample_of, score_of = [], [], []
        bs = self.block_size
        for r, n in zip(batch.requests, batch.num_new_tokens):
            start = r.num_computed_tokens
            prompt_len = len(r.prompt_token_ids)
            # the new tokens, without copying the whole sequence (decode: just the last output token)
            tokens = r.prompt_token_ids[start:start + n] + r.output_token_ids[max(start - prompt_len, 0):
                                                                           max(start + n - prompt_len, 0)]
            input_ids += tokens
            positions += range(start, start + n)
            slots += [r.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            row0 = query_start[-1]
            query_start.append(row0 + n)
            seq_lens.append(start + n)
            if r.params.prompt_logprobs:
                # row of position p predicts token p + 1; score prompt tokens not scored yet
                done = len(r.prompt_logprobs or [None])
                first, last = max(start, done - 1), min(start + n, len(r.prompt_token_ids) - 1)
                if first < last:
                    score_of.append((r, len(logit_rows), r.prompt_token_ids[first + 1:last + 1]))
                    logit_rows += range(row0 + first - start, row0 + last - start)
            if start + n == r.num_tokens:      # this step covers its last token: sample the next one
                sample_of.append((r, len(logit_rows)))
                logit_rows.append(row0 + n - 1)
        max_blocks = max(len(r.block_table) for r in batch.requests)
        block_tables = [r.block_table + [0] * (max_blocks - len(r.block_table)) for r in batch.requests]
        num_rows = len(input_ids)
        # compiled: steps that sample every sequence's next token from one new token each (decode)
        compiled = self.compiled_decode is not None and len(sample_of) == num_rows
        if compiled:    # padded to the graph's minimum rows and table columns, the padding on the null block
            self.compiled_decode.pad(input_ids, positions, slots, seq_lens, query_start, block_tables)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64), block_tables=self._tensor(block_tables, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32), query_start_loc=self._tensor(query_start, torch.int32),
            max_query_len=max(batch.num_new_tokens), max_seq_len=max(seq_lens), backend=self.backend,
            all_slots_valid=compiled)   # a decode step's slots are all real ones (its padding: the null block's)
        return StepInputs(self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), meta,
                          num_rows, compiled, logit_rows, sample_of, score_of)

    def _forward(self, step: StepInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """float32 logits ``(N, V)`` of the step's logit rows (None when it needs none), and, from a compiled
        decode step, each row's argmax ``(N,)``."""
        if step.compiled:
            outputs = self.compiled_decode.run(step.input_ids, step.positions, step.meta, num_rows=step.num_rows)
            if outputs is not None:   # decode: row i samples request i
                return outputs[0][:step.num_rows], outputs[1][:step.num_rows]          # (B, V) float32, (B,)
            self.compiled_decode = None      # the compile failed: eager steps from now on
        # (padding rows, if a compile failed, write the null block and are not read back)
        hidden = self.model(step.input_ids, step.positions, self.caches, step.meta)   # (T, C)
        if not step.logit_rows:
            return None, None
        return self.model.compute_logits(hidden[self._tensor(step.logit_rows, torch.int64)]), None  # (N, V) float32

    def _sample(self, step: StepInputs, logits: torch.Tensor, greedy_tokens: torch.Tensor | None,
                compiled_now: bool) -> StepResult:
        """The prompt log-probs the step scored and the tokens it sampled, from its logits ``(N, V)``."""
        result = StepResult({}, {}, compiled_now)
        if step.score_of:
            logprobs = torch.log_softmax(logits, dim=-1)
            for r, row, targets in step.score_of:
                rows = torch.arange(row, row + len(targets), device=self.device)
                result.prompt_logprobs[id(r)] = logprobs[rows, self._tensor(targets, torch.int64)].tolist()
        if step.sample_of:
            rows = [row for _, row in step.sample_of]
            if rows != list(range(len(logits))):      # (a compiled decode step samples every row, in order)
                logits, greedy_tokens = logits[rows], None
            tokens = sample(logits, [r.params for r, _ in step.sample_of], [r.generator for r, _ in step.sample_of],
                            greedy_tokens=greedy_tokens)
            result.sampled = {id(r): t for (r, _), t in zip(step.sample_of, tokens)}
        return result

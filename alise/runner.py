"""Model runner: owns the model and the KV pool, turns a scheduled batch into one forward pass and samples."""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch

from alise import kernels
from alise.model import AttentionMetadata, Llama
from alise.model import fp32_gemm as model_fp32_gemm
from alise.sampling import sample
from alise.sched.scheduler import ScheduledBatch

GiB = 1 << 30
DEFAULT_CPU_KV_GB = 1.0
KEY_CALIBRATION_TOKENS = 512
KEY_BALANCE_EXPONENT = 0.1
# torch.compile specializes a dimension of size 1, so compiled decode steps pad the batch and the block tables
# to at least this many rows / columns: every decode step then runs on one compiled graph
MIN_COMPILED_DIM = 2
# compiled bf16 decode steps with at least this many rows run their projections on float32 GEMMs
# (``model.fp32_gemm``): compute-bound there, where the float32 GEMM beats oneDNN's bf16 one on CPUs without
# AMX; fewer rows wait on reading the weights, which float32 doubles
FP32_GEMM_MIN_ROWS = 32


def key_calibration_text() -> str:
    """Fixed real English text for ``ModelRunner.calibrate_keys``: CPython's pydoc topics (sorted by name) from
    character 300000 on, far from the start that the perplexity measurements score."""
    import pydoc_data.topics
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return text[300000:308000]


@dataclass
class StepResult:
    sampled: dict[int, int]                       # id(request) -> new token, for requests that finished their pending tokens
    prompt_logprobs: dict[int, list[float]]       # id(request) -> log-probs of prompt tokens scored this step
    compiled_now: bool = False                    # the step's time includes compiling the decode graph


class ModelRunner:
    def __init__(self, model: Llama, *, kv_dtype: str, block_size: int, num_blocks: int | None,
                 kv_cache_memory_gb: float | None, backend: str, device: torch.device, swap_kv_dtype: str = "auto",
                 compile: bool = False):
        self.model, self.device, self.backend = model, device, backend
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
        # swapped-out KV: copied in the pool's own format (exact; "auto", or its legacy name "bf16"), or, for
        # unquantized pools, compressed on the way out when swap_kv_dtype is "int8" / "int4" (lossy: outputs
        # then depend on the load); quantized pages are always copied as they are
        exact = kv_dtype in ("int8", "int4") or swap_kv_dtype in ("auto", "bf16")
        self.swap_kv_dtype = kv_dtype if exact else swap_kv_dtype
        self.swap_bytes_per_token = cfg.num_hidden_layers * kernels.bytes_per_token(
            self.swap_kv_dtype, self.num_kv_heads, self.head_dim)
        # compiled decode steps get one more block than the allocator hands out: the padding rows' page
        self.null_block = num_blocks if compile else None
        self.caches = [kernels.allocate_layer_cache(num_blocks=num_blocks + int(compile), block_size=block_size,
                                                    num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                                    kv_dtype=kv_dtype, device=device)
                       for _ in range(cfg.num_hidden_layers)]
        self._compiled_decode = self._compile_decode() if compile else None
        # float32 GEMMs for bf16 weights (model.fp32_gemm) pay off without AMX, where oneDNN's bf16 GEMM is slow
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        self._fp32_gemm_helps = model.embed_tokens.weight.dtype == torch.bfloat16 and not amx
        self._compiled_graphs: set[bool] = set()    # fp32_gemm settings with a compiled graph

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def calibrate_keys(self, token_ids: list[int]) -> None:
        """Set every layer's ``key_center`` and ``key_balance`` (see ``Attention``) from ``token_ids``, for int4
        pools. Both leave attention exact; they change what the quantizer sees.

        * ``key_center``: the mean key after RoPE. It removes the keys' per-channel offsets (large in the
          low-frequency RoPE channels, which barely rotate), so the quantizer's range is spent on what differs
          between keys.
        * ``key_balance``: per channel ``(E[k^2] / E[q^2]) ** KEY_BALANCE_EXPONENT`` of the centred keys and
          the queries of the kv head, normalized to unit RMS. A quantization error in key channel c moves the
          scores by ``q_c * error_c``, so channels where queries are small can be stored coarser; the exponent
          was chosen by measurement (``kernels/quant.py``: 0.05 / 0.1 / 0.15 / 0.2 / 0.5 gave +3.3 / +2.3 /
          +2.4 / +3.0 / worse).

        Token 0 (the attention sink, an outlier) is left out of both statistics.
        """
        num_tokens = len(token_ids)
        if num_tokens < 2:
            raise ValueError("calibrate_keys needs at least 2 calibration tokens")
        model = self.model
        attns = [layer.self_attn for layer in model.layers]
        for attn in attns:
            attn.key_center = attn.key_balance = None
        caches = [kernels.allocate_layer_cache(num_blocks=1, block_size=num_tokens, num_kv_heads=self.num_kv_heads,
                                               head_dim=self.head_dim, kv_dtype="fp32", device=self.device)
                  for _ in model.layers]
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            block_tables=self._tensor([[0]], torch.int32), seq_lens=self._tensor([num_tokens], torch.int32),
            query_start_loc=self._tensor([0, num_tokens], torch.int32),
            max_query_len=num_tokens, max_seq_len=num_tokens, backend="torch")
        inputs = {}   # attention module -> its (normed x, cos, sin) of the calibration pass
        hooks = [attn.register_forward_pre_hook(lambda module, args: inputs.__setitem__(module, args[:3]))
                 for attn in attns]
        try:
            model(self._tensor(token_ids, torch.int64), torch.arange(num_tokens, device=self.device), caches, meta)
        finally:
            for hook in hooks:
                hook.remove()
        for attn in attns:
            q, k, _ = attn.project(*inputs[attn])
            q, k = q[1:].float(), k[1:].float()                                    # (n, Hq, D), (n, Hkv, D)
            center = k.mean(0)                                                     # (Hkv, D)
            key_energy = (k - center).pow(2).mean(0)                               # (Hkv, D)
            query_energy = q.unflatten(1, (self.num_kv_heads, -1)).pow(2).mean((0, 2))   # (Hkv, D)
            balance = (key_energy / query_energy.clamp_min(1e-12)).clamp_min(1e-12) ** KEY_BALANCE_EXPONENT
            balance = balance / balance.pow(2).mean(-1, keepdim=True).sqrt()
            attn.key_center, attn.key_balance = center, balance    # fp32 (see Attention.forward)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        for request, blocks in batch.swap_out:    # reads blocks freed this step: before anything writes them
            request.swapped_kv = self._copy_out(blocks)
        for request, blocks in batch.swap_in:
            self._copy_in(request.swapped_kv, blocks)
            request.swapped_kv = None
        if not batch.requests:
            return StepResult({}, {})
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
        # compiled: steps that sample every sequence's next token from one new token each (decode)
        compiled = self._compiled_decode is not None and len(sample_of) == len(input_ids)
        if compiled:    # pad to MIN_COMPILED_DIM rows and table columns, the padding on the null block
            num_rows, null = len(input_ids), self.null_block
            width = max(max_blocks, MIN_COMPILED_DIM)
            block_tables = [t + [null] * (width - len(t)) for t in block_tables]
            for _ in range(MIN_COMPILED_DIM - num_rows):    # a 1-token sequence on the null block
                input_ids.append(0)
                positions.append(0)
                slots.append(null * bs)
                seq_lens.append(1)
                query_start.append(query_start[-1] + 1)
                block_tables.append([null] * width)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64), block_tables=self._tensor(block_tables, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32), query_start_loc=self._tensor(query_start, torch.int32),
            max_query_len=max(batch.num_new_tokens), max_seq_len=max(seq_lens), backend=self.backend)
        input_ids, positions = self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64)
        fp32 = compiled and num_rows >= FP32_GEMM_MIN_ROWS and self._fp32_gemm_helps
        compiled_now = compiled and fp32 not in self._compiled_graphs
        outputs = self._run_compiled(input_ids, positions, meta, fp32_gemm=fp32) if compiled else None
        greedy_tokens = None
        if outputs is not None:   # decode: row i samples request i
            logits, greedy_tokens = outputs[0][:num_rows], outputs[1][:num_rows]          # (B, V) float32, (B,)
        else:     # (padding rows, if a compile failed, write the null block and are not read back)
            hidden = self.model(input_ids, positions, self.caches, meta)
            if not logit_rows:
                return StepResult({}, {})
            logits = self.model.compute_logits(hidden[self._tensor(logit_rows, torch.int64)])  # (N, V) float32
        result = StepResult({}, {}, compiled_now)
        if score_of:
            logprobs = torch.log_softmax(logits, dim=-1)
            for r, row, targets in score_of:
                rows = torch.arange(row, row + len(targets), device=self.device)
                result.prompt_logprobs[id(r)] = logprobs[rows, self._tensor(targets, torch.int64)].tolist()
        if sample_of:
            rows = [row for _, row in sample_of]
            if rows != list(range(len(logits))):      # (a compiled decode step samples every row, in order)
                logits, greedy_tokens = logits[rows], None
            tokens = sample(logits, [r.params for r, _ in sample_of], [r.generator for r, _ in sample_of],
                            greedy_tokens=greedy_tokens)
            result.sampled = {id(r): t for (r, _), t in zip(sample_of, tokens)}
        return result

    def _compile_decode(self):
        """``compute_logits(model(...))`` of a decode step, and each row's argmax, as one ``torch.compile`` graph.

        Inductor fuses each layer's ~100 small eager ops (norms, RoPE, KV write, attention's gather and mask)
        into a few C++ loops; freezing makes the weights constants that it packs for oneDNN, and cpp_wrapper
        calls the kernels with no Python in between (``_run_compiled`` sets both). ``dynamic=True``: one graph
        for every batch size >= 2 and table width >= 2 (``MIN_COMPILED_DIM``); a second one, compiled when a
        bf16 batch first reaches ``FP32_GEMM_MIN_ROWS`` rows, runs the projections on float32 GEMMs
        (``model.fp32_gemm``). Measured side by side on the default model, bf16, 2 CPU cores
        (``python -m alise.bench.generate --sections compile``): decode 1.5x the eager engine's tokens/s at
        batch 1 and 8, 1.4x at 32 and 64 concurrent requests (1.3x before the float32-GEMM graph). The frozen,
        packed weights are further copies beside the eager model's (which prefill steps use): bf16 for the first
        graph, float32 for the second (measured RSS: +0.55 GB and +0.91 GB on the default model).
        """
        for cache in self.caches:   # the pages never change shape: no size symbols (or guards relating them)
            for t in (cache.k, cache.v, cache.k_scale, cache.v_scale):
                if t is not None:
                    torch._dynamo.mark_static(t)
        model, caches = self.model, self.caches

        def decode_logits(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
            # a closure, not a bound method: dynamo then sees the weights as the module's parameters, which
            # freezing needs in order to pack them
            logits = model.compute_logits(model(input_ids, positions, caches, meta))    # (B, V) float32
            # greedy rows' tokens in the same pass over the logits (sample() would read them again)
            return logits, logits.argmax(dim=-1)
        return torch.compile(decode_logits, dynamic=True)

    def _run_compiled(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, *,
                      fp32_gemm: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The compiled step's float32 logits ``(B, V)`` and their argmax ``(B,)``, or None (and eager steps
        from then on) if torch.compile fails."""
        if fp32_gemm not in self._compiled_graphs:
            rows = (f" for batches of {'>=' if fp32_gemm else '<'} {FP32_GEMM_MIN_ROWS}"
                    if self._fp32_gemm_helps else "")
            print(f"alise: compiling the decode step{rows} with torch.compile (once per engine; about a minute "
                  f"on 2 CPU cores)", file=sys.stderr, flush=True)
            self._compiled_graphs.add(fp32_gemm)
        # every slot of a decode step is a real one: tell write_kv so, instead of it checking for -1 slots
        # (a check on tensor values, which would split the compiled graph)
        meta.scratch["write_kv"] = (None, meta.slot_mapping)
        # inductor reads these two when it compiles (the first call, and any recompile), not from compile()'s
        # options: patched around every call, they apply to this graph only
        # no "duck sizing" either: dims that happen to be equal at the first step (2 rows, 2 table columns) would
        # otherwise share a symbol, and a recompile would follow when they part
        # dynamo guards on fp32_gemm's setting, so each setting gets (and then reuses) a graph of its own
        try:
            with torch._inductor.config.patch(freezing=True, cpp_wrapper=True), \
                    torch.fx.experimental._config.patch(use_duck_shape=False), model_fp32_gemm(fp32_gemm):
                return self._compiled_decode(input_ids, positions, meta)
        except Exception as error:    # a compiler problem must not take the engine and its requests down
            warnings.warn(f"alise: torch.compile of the decode step failed, decode steps run eager from now on: "
                          f"{type(error).__name__}: {str(error)[:500]}", RuntimeWarning, stacklevel=2)
            self._compiled_decode = None
            self.model.pack_for_cpu()     # what the eager engine runs on (see Llama.pack_for_cpu)
            return None

    def _copy_out(self, blocks: list[int]) -> list[tuple]:
        """Host copy of ``blocks``' pages in every layer, compressed to ``swap_kv_dtype`` if the pool is not."""
        index = torch.tensor(blocks, device=self.device)
        compress = self.swap_kv_dtype != self.kv_dtype
        saved = []
        for c in self.caches:
            if compress:   # (n, bs, Hkv, D) -> quantized data + scales, in the pool formats (int4 key groups)
                key_groups = kernels.reference.int4_key_groups(self.head_dim) if self.swap_kv_dtype == "int4" else 1
                saved.append(tuple(t.to("cpu") for page, groups in ((c.k[index], key_groups), (c.v[index], 1))
                                   for t in kernels.reference.quantize(page.float(), self.swap_kv_dtype,
                                                                      groups=groups)))
            else:
                saved.append(tuple(t[index].to("cpu") for t in (c.k, c.v, c.k_scale, c.v_scale) if t is not None))
        return saved

    def _copy_in(self, host: list[tuple], blocks: list[int]) -> None:
        index = torch.tensor(blocks, device=self.device)
        compress = self.swap_kv_dtype != self.kv_dtype
        for cache, saved in zip(self.caches, host):
            if compress:
                k_data, k_scale, v_data, v_scale = (t.to(self.device) for t in saved)
                cache.k[index] = self._decompress(k_data, k_scale).to(cache.k.dtype)
                cache.v[index] = self._decompress(v_data, v_scale).to(cache.v.dtype)
            else:
                live = [t for t in (cache.k, cache.v, cache.k_scale, cache.v_scale) if t is not None]
                for dst, src in zip(live, saved):
                    dst[index] = src.to(self.device)

    def _decompress(self, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.swap_kv_dtype == "int4":   # int4 codes live in the Hadamard-rotated basis (kernels/reference.py)
            return kernels.reference.dequantize_int4(data, scale, unrotate=True)
        return kernels.reference.dequantize(data, scale, self.swap_kv_dtype)

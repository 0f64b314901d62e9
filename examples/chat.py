"""Streaming multi-turn chat with the default model (SmolLM2-135M-Instruct, fetched and converted on first use).

    python examples/chat.py                       # interactive; empty line or Ctrl-D quits, /reset forgets
    python examples/chat.py --prompt "Hi there"   # one answer, then exit

Ctrl-C during an answer stops that answer (a second Ctrl-C quits); Ctrl-C at the prompt quits.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import time

from alise import LLM, SamplingParams


def parse_args() -> argparse.Namespace:
    """The command line, checked before the model loads."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a path to an HF-style Llama folder")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="system message (default: the model's own)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens")
    parser.add_argument("--dtype", default="float32", choices=["auto", "bfloat16", "float32"],
                        help="weights and activations (default float32: this 135M model's greedy answers flip on "
                             "close calls in bfloat16, e.g. 'What is the capital of France?'; bfloat16 decodes "
                             "~1.5x faster on a CPU; auto: bfloat16 where the hardware has fast bf16, else float32)")
    parser.add_argument("--kv-dtype", default="auto", choices=["auto", "bf16", "int8", "int4"], help="KV cache storage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile (CPU): ~1.5x faster decoding after about "
                             "a minute of compilation at the first answer")
    args = parser.parse_args()
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    return args


def main() -> None:
    args = parse_args()
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    llm = LLM(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype, policy="fcfs", seed=args.seed,
              compile=args.compile)
    if args.compile:   # compile now (one decode step), not in the middle of the first answer
        llm.generate([[0]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        answer(llm, history, args.prompt, params)
        return
    print("alise chat: empty line or Ctrl-D quits, /reset starts over.", file=sys.stderr)
    while True:
        try:
            message = input("> ").strip()
        except EOFError:
            break                                 # Ctrl-C here raises KeyboardInterrupt: see the end of the file
        if not message:
            break
        if message == "/reset":
            del history[int(bool(args.system)):]
            continue
        answer(llm, history, message, params)


def answer(llm: LLM, history: list[dict], message: str, params: SamplingParams) -> None:
    """Stream the answer to ``message`` (the conversation so far in ``history``, which gains both turns)."""
    history.append({"role": "user", "content": message})
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(history), add_special_tokens=False)
    stream, parts, first, interrupted = llm.stream(prompt, params), [], None, False
    with StopOnCtrlC() as ctrl_c:
        try:
            for delta in stream:
                if first is None:
                    first = time.perf_counter()   # the prompt has been processed: decoding starts here
                parts.append(delta)
                print(delta, end="", flush=True)
                if ctrl_c.pressed:
                    interrupted = True
                    break
        finally:
            stream.close()                        # an unfinished request is aborted, its KV freed
    end = time.perf_counter()
    history.append({"role": "assistant", "content": "".join(parts)})
    if interrupted:
        print("\n[interrupted]", file=sys.stderr)
        return
    n = len(llm.tokenizer.encode("".join(parts), add_special_tokens=False))
    # the first token came with the prompt's processing; the other n - 1 were decoded after it
    rate = f", {(n - 1) / (end - first):.1f} decode tokens/s" if n > 1 and end > first else ""
    print(f"\n[{n} tokens{rate}]", file=sys.stderr)


class StopOnCtrlC:
    """While active, the first Ctrl-C only sets ``pressed`` (the answer loop stops at its next piece of text, so
    the engine is never interrupted mid-step); a second one raises KeyboardInterrupt as usual."""

    def __enter__(self) -> "StopOnCtrlC":
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                     # Ctrl-C at the prompt, while loading, or twice in an answer
        print(file=sys.stderr)
        sys.exit(130)

"""alise: a compact LLM serving engine with speculative (shortest-predicted-job-first) scheduling."""
from alise.engine import LLM, LLMEngine, RequestOutput
from alise.sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams"]

"""The OpenAI-compatible server (alise/serve.py) end to end: a uvicorn server in a thread on a free loopback port,
the tiny random model, the official ``openai`` client and raw ``httpx`` streams against it."""
from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from alise import LLM, SamplingParams  # noqa: E402
from alise.serve import Server, TextStream, create_app  # noqa: E402

MODEL = "tiny"
PROMPTS = ["The quick brown fox", "def main():", "In the beginning", "Python is a language",
           "import os", "class Foo:", "Return the value of", "for i in range(10):"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def tiny_llm(folder, **kwargs) -> LLM:
    return LLM(str(folder), **(dict(dtype="float32", policy="fcfs", kv_cache_blocks=256) | kwargs))


@contextmanager
def running(server: Server):
    """Serve ``server`` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    """A separate engine on the same folder: what the server's answers must equal."""
    return tiny_llm(tiny_model_dir)


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    server = Server(tiny_llm(tiny_model_dir, max_num_seqs=64), model_name=MODEL)
    with running(server) as url:
        yield url, server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(server: Server, timeout: float = 15) -> None:
    """Until the engine holds no request and every KV block is free."""
    engine = server.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if (stats.num_requests == 0 and stats.kv_blocks_used == 0 and server.loop.in_flight == 0
                and not engine.has_unfinished()):
            return
        time.sleep(0.02)
    raise AssertionError(f"not idle: {stats.num_requests} requests, {stats.kv_blocks_used}/"
                         f"{stats.kv_blocks_total} blocks used, {server.loop.in_flight} in flight")


def sse_events(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---------------------------------------------------------------------------------------------------------------


def test_models_health_metrics(served, client):
    url, server = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    m = httpx.get(url + "/metrics", params={"format": "json"}).json()
    assert m["scheduler_policy"] == "fcfs" and m["kv_blocks_total"] == 256
    assert {"requests_waiting", "requests_running", "kv_blocks_used"} <= set(m)
    text = httpx.get(url + "/metrics").text
    assert "alise_kv_blocks_used " in text and 'alise_scheduler_info{policy="fcfs"' in text


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_generate(client, ref, served, stream):
    prompt = PROMPTS[0]
    want = ref.generate(prompt, SamplingParams(temperature=0, max_tokens=24))[0]
    assert want.text.strip()
    if not stream:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        text, reason, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage
    else:
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
        assert not chunks[-1].choices and len(chunks) > 3          # streamed in pieces, usage last
    assert text == want.text and reason == want.finish_reason
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # token-id prompts too
    ids = ref.tokenizer.encode(PROMPTS[1])
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == ref.generate(ids, SamplingParams(temperature=0, max_tokens=8))[0].text
    wait_idle(served[1])


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_llm_chat(client, ref, served, stream):
    want = ref.chat(CHAT, SamplingParams(temperature=0, max_tokens=20))
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
        assert r.choices[0].message.role == "assistant"
        text, reason, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    else:
        chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0,
                                                     stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        reason, usage = chunks[-1].choices[0].finish_reason, chunks[-1].usage   # usage rides on the last chunk
    assert text == want.text and reason == want.finish_reason
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_and_stop_token_ids(client, ref, stream):
    prompt = PROMPTS[2]
    full = ref.generate(prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    assert len(stop) == 3

    def ask(**kw):
        kw = dict(model=MODEL, prompt=prompt, max_tokens=32, temperature=0, extra_body={"ignore_eos": True}) | kw
        if not stream:
            r = client.completions.create(**kw)
            return r.choices[0].text, r.choices[0].finish_reason
        chunks = list(client.completions.create(stream=True, **kw))
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    assert ask(stop=[stop, "\x00never"]) == (full.text[:full.text.index(stop)], "stop")
    token = full.token_ids[5]
    want = ref.generate(prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                                               stop_token_ids=[token]))[0]
    assert ask(extra_body={"ignore_eos": True, "stop_token_ids": [token]}) == (want.text, "stop")


def test_text_stream_holds_back_a_possible_stop_string():
    class Chars:       # token id = one character
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    ts = TextStream(Chars(), ["STOP"])
    assert ts.push([ord(c) for c in "abcST"]) == "abc"     # "ST" may begin "STOP": held back
    assert ts.push([ord("x")]) == "STx"                     # it did not
    assert ts.push([ord(c) for c in "ySTOPz"]) == "y" and ts.stopped


def test_32_streams_a_third_disconnecting(served, ref):
    url, server = served
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.text for o in ref.generate(prompts, params)]
    results: dict[int, object] = {}

    def client_thread(i: int):
        leaving = i % 3 == 0       # these ask for long answers, so they are surely mid-stream when they go
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 200 if leaving else 24, "temperature": 0,
                "ignore_eos": True, "stream": True}
        try:
            with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                text, n = "", 0
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        results[i] = text
                        return
                    n += 1
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if leaving and n == 2:
                        results[i] = "disconnected"
                        return          # leaving the block closes the connection mid-stream
                results[i] = f"no [DONE] after {text!r}"
        except Exception as e:   # noqa: BLE001
            results[i] = e

    aborted = server.loop.counters.aborted
    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(32):
        assert results.get(i) == ("disconnected" if i % 3 == 0 else want[i]), i
    wait_idle(server)
    assert server.loop.counters.aborted - aborted == 11          # every disconnect aborted its request


BAD = [  # endpoint, body, status, param
    ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "top_p": 2}, 400, "top_p"),
    ("completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("completions", {"max_tokens": 4}, 400, "prompt"),
    ("completions", {"prompt": [5, 100000]}, 400, "prompt"),
    ("completions", {"prompt": [5] * 300}, 400, "prompt"),                     # over the 256-token context
    ("completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model"),
    ("chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages"),
    ("chat/completions", {"messages": "hello"}, 400, "messages"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("chat/completions", {"messages": CHAT, "stream": "yes"}, 400, "stream"),
]


def test_bad_requests_name_the_field_and_the_server_goes_on(served, client):
    url, server = served
    with httpx.Client(base_url=url + "/v1", timeout=60) as c:
        for endpoint, body, status, param in BAD:
            body = {"model": MODEL} | body
            r = c.post("/" + endpoint, json=body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and param in err["message"] and err["type"], (body, err)
            if body.get("prompt") == [5] * 300:
                assert err["code"] == "context_length_exceeded" and "context" in err["message"]
            if param == "messages" and isinstance(body.get("messages"), list):
                assert "0" in err["message"]                                    # the message's index
            ok = c.post("/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        r = c.post("/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=-0.5)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    wait_idle(server)


def test_queue_full_gets_503_with_retry_after(tiny_model_dir):
    llm = tiny_llm(tiny_model_dir, max_num_seqs=1)
    step = llm.engine.step
    llm.engine.step = lambda: (time.sleep(0.05), step())[1]     # slow steps: the streams stay open meanwhile
    server = Server(llm, model_name=MODEL, max_queue=1)
    with running(server) as url:
        long = {"model": MODEL, "messages": CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b, httpx.Client(timeout=60) as c:
            # two open streams fill the one seat and the one queue place (a chat stream's first chunk comes as
            # soon as the engine has taken the request)
            with a.stream("POST", url + "/v1/chat/completions", json=long) as ra, \
                    b.stream("POST", url + "/v1/chat/completions", json=long) as rb:
                lines_a, lines_b = ra.iter_lines(), rb.iter_lines()      # (closing one closes its connection)
                assert next(lines_a).startswith("data: ") and next(lines_b).startswith("data: ")
                r = c.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
                assert httpx.get(url + "/metrics", params={"format": "json"}).json()["requests_in_flight"] == 2
            wait_idle(server)                         # both streams were dropped: aborted, KV freed
            r = c.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200


def test_http_bench_against_the_server(served, tmp_path):
    from alise.bench import http as bench
    url, server = served
    out = tmp_path / "bench.json"
    results = bench.main(["--url", url, "--workload", "alpaca", "--num-requests", "12", "--rates", "inf,50",
                          "--max-tokens", "8", "--disconnect-fraction", "0.25", "--json", str(out)])
    for r in results:
        assert r["failed"] == 0 and r["completed"] + r["disconnected"] == 12 and r["completed"] >= 1
        assert r["ttft_mean"] > 0 and r["output_tokens_per_s"] > 0 and r["normalized_latency"] > 0
        assert all(q["output_tokens"] == q["max_tokens"] for q in r["requests"] if q["status"] == "ok")
    assert json.loads(out.read_text())["results"][0]["rate"] == float("inf")
    wait_idle(server)


def test_bench_serve_url_gives_the_serve_report(served, tmp_path):
    """``python -m alise.bench serve --url``: the in-process benchmark's report (rows named by the server's
    policy, the rates asked for, normalized latency, the overload measure) measured over HTTP, JSON and plot."""
    from alise.bench.__main__ import main as bench_main
    url, server = served
    out, plot = tmp_path / "serve.json", tmp_path / "serve.png"
    bench_main(["serve", "--url", url, "--workload", "alpaca", "--num-requests", "6", "--rates", "100,200",
                "--max-tokens", "6", "--json", str(out), "--plot", str(plot)])
    report = json.loads(out.read_text())
    assert report["transport"] == "http" and report["rates"] == [100.0, 200.0]
    for r in report["results"]:
        assert r["policy"] == "fcfs" and r["failed"] == 0 and r["num_requests"] == 6
        assert r["normalized_latency"] > 0 and 0.0 <= r["backlog_fraction"] <= 1.0
        # normalized latency is latency over output tokens: it cannot exceed the mean latency
        assert r["normalized_latency"] <= r["mean_latency"] + 1e-9
    assert plot.stat().st_size > 0
    wait_idle(server)


def test_backlog_fraction_from_client_timings():
    """Tokens arrive evenly between a request's first and last chunk: at the last send time, a request that has
    not started counts whole, one half done counts half, a finished one not at all."""
    from alise.bench.http import backlog_fraction
    recs = [dict(status="ok", send_at=0.0, sent=0.0, output_tokens=10, first_chunk_at=1.0, last_chunk_at=2.0),
            dict(status="ok", send_at=4.0, sent=0.0, output_tokens=10, first_chunk_at=5.0, last_chunk_at=7.0),
            dict(status="ok", send_at=3.0, sent=0.0, output_tokens=20, first_chunk_at=3.0, last_chunk_at=5.0)]
    # last send at 4.0: first done (0 left), second not started (10 left), third half way (10 left)
    assert backlog_fraction(recs) == pytest.approx(20 / 40)

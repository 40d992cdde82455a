"""MedFILIP's GPT-IE path: entities from an OpenAI-compatible chat endpoint. The endpoint is a
real HTTP server on loopback speaking the chat-completions protocol (as the S3 tests use moto);
its "model" answers with the offline rules' entities as JSON, so the answers are known."""

from __future__ import annotations

import json
import subprocess
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from hilum.cluster.local import free_port
from hilum.trainer.data.entities import Entity, extract_entities
from hilum.trainer.data.llm_entities import DEFAULT_PROMPT, LLMExtractor, UnparsedReply, parse_entities
from tests.conftest import HILUM, OUTSIDE


class ChatServer:
    """/v1/chat/completions on 127.0.0.1; ``fail_next`` requests answer 503 first; a report
    containing GIBBERISH gets prose back; ``key`` (if set) must come as a bearer token."""

    def __init__(self, key: str | None = None) -> None:
        self.requests: list[dict] = []
        self.fail_next, self.key = 0, key
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                if server.key and self.headers.get("Authorization") != f"Bearer {server.key}":
                    return self._send(401, {"error": "bad key"})
                if server.fail_next > 0:
                    server.fail_next -= 1
                    return self._send(503, {"error": "busy"})
                report = body["messages"][-1]["content"]
                if "GIBBERISH" in report:
                    content = "I am sorry, I cannot help with that."
                else:
                    items = [e.to_dict() for e in extract_entities(report)] + [{"severity": "mild", "location": "left"}]
                    content = "```json\n" + json.dumps(items) + "\n```"
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def chat():
    server = ChatServer()
    yield server
    server.close()


REPORTS = ["Small left pleural effusion. No pneumothorax.", "Possible right lower lobe pneumonia.", "Lungs are clear."]


def test_parse_entities_drops_triplets_without_category_and_refuses_prose():
    got = parse_entities('Sure:\n```json\n[{"severity": "Mild", "location": "Left  Upper", "category": "Nodule"},'
                         ' {"severity": "mild", "location": "left"}, {"category": "effusion", "uncertain": true}]\n```')
    assert got == [Entity("mild", "left upper", "nodule"), Entity("", "", "effusion", True)]
    with pytest.raises(UnparsedReply):
        parse_entities("No findings.")


def test_extractor_asks_with_the_prompt_caches_and_retries(chat, tmp_path):
    extractor = LLMExtractor(chat.url, "tiny-model", cache_dir=str(tmp_path / "cache"), backoff_s=0.01)
    chat.fail_next = 2  # the first two answers are 503: retried
    got = extractor.extract_many(REPORTS)
    assert got == [extract_entities(r) for r in REPORTS]
    assert got[0] == [Entity("small", "left", "pleural effusion")] and got[2] == []
    body = chat.requests[-1]["body"]
    assert body["model"] == "tiny-model" and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": DEFAULT_PROMPT.read_text()}
    asked = len(chat.requests)
    again = LLMExtractor(chat.url, "tiny-model", cache_dir=str(tmp_path / "cache")).extract_many(REPORTS)
    assert again == got and len(chat.requests) == asked  # every answer came from the cache


def test_unreachable_endpoint_fails_naming_it_and_key_stays_secret(tmp_path, monkeypatch, caplog):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1:\d+/v1/chat/completions unreachable after 3 tries"):
        LLMExtractor(url, "m", retries=2, backoff_s=0.01).extract_many(REPORTS)
    server = ChatServer(key="sk-secret-123")
    try:
        monkeypatch.setenv("HILUM_LLM_KEY", "sk-secret-123")
        assert LLMExtractor(server.url, "m", api_key_env="HILUM_LLM_KEY").extract(REPORTS[0]) == extract_entities(REPORTS[0])
        monkeypatch.setenv("HILUM_LLM_KEY", "sk-wrong-456")
        with pytest.raises(RuntimeError, match="HTTP 401") as err:
            LLMExtractor(server.url, "m", api_key_env="HILUM_LLM_KEY").extract(REPORTS[1])
        assert "sk-" not in str(err.value) and "sk-" not in caplog.text
        monkeypatch.delenv("HILUM_LLM_KEY")
        with pytest.raises(RuntimeError, match="HILUM_LLM_KEY is not set"):
            LLMExtractor(server.url, "m", api_key_env="HILUM_LLM_KEY").extract(REPORTS[1])
    finally:
        server.close()


def test_shards_build_with_llm_entities_counts_unparsed_replies(chat, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    reports = [*REPORTS, "FINDINGS: GIBBERISH that the model will not parse. IMPRESSION: none given here."]
    rows = ["image,report,split"]
    for i, report in enumerate(reports):
        Image.new("L", (32, 32), 30 * i).save(images / f"{i}.png")
        rows.append(f'images/{i}.png,"{report}",train')
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    cmd = [*HILUM, "shards", "build", "--csv", str(tmp_path / "data.csv"), "--out", str(out), "--workers", "1",
           "--unsectioned", "findings", "--entities", "llm", "--llm-url", chat.url, "--llm-model", "tiny-model",
           "--llm-cache", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=OUTSIDE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "entities_unparsed 1" in proc.stdout, proc.stdout
    import webdataset as wds

    manifest = json.loads((out / "train.json").read_text())
    samples = list(wds.WebDataset([str(out / s["url"]) for s in manifest["shards"]], shardshuffle=False).decode())
    by_report = {s["json"]["findings"]: s["json"].get("entities") for s in samples}
    assert by_report[REPORTS[0]] == [e.to_dict() for e in extract_entities(REPORTS[0])]
    assert Counter(e is None for e in by_report.values()) == Counter({False: 3, True: 1})  # the unparsed one has none
    bad = subprocess.run([*HILUM, "shards", "build", "--csv", str(tmp_path / "data.csv"), "--out", str(out),
                          "--entities", "llm", "--llm-url", chat.url], capture_output=True, text=True, timeout=120, cwd=OUTSIDE)
    assert bad.returncode != 0 and "--llm-model" in bad.stderr

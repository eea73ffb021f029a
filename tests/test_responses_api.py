"""`POST /v1/responses`: text and message input, previous_response_id over sessions, store, streaming."""

import httpx
import openai
import pytest

from tests.server_helpers import MODEL_NAME, running_server, save_tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("models"))
    with running_server(model_dir, tmp_path_factory.mktemp("sessions")) as (url, _):
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_chained_responses_reuse_the_previous_state(client, server):
    first = client.responses.create(model=MODEL_NAME, input="Tell me a story", max_output_tokens=8,
                                    temperature=0, instructions="Be brief.")
    assert first.object == "response" and first.status == "incomplete"  # hit max_output_tokens
    assert first.output[0].role == "assistant" and first.usage.output_tokens == 8
    second = client.responses.create(model=MODEL_NAME, input="Go on", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0, instructions="Be brief.")
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 8 * 8 > 0
    # The same conversation sent in full, stored nowhere, gives the same answer.
    replay = client.responses.create(
        model=MODEL_NAME, store=False, max_output_tokens=8, temperature=0, instructions="Be brief.",
        input=[{"role": "user", "content": "Tell me a story"},
               {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "Go on"}])
    assert replay.output_text == second.output_text and replay.usage.input_tokens == second.usage.input_tokens
    # Branching from the first again works: it was not overwritten.
    branch = client.responses.create(model=MODEL_NAME, input="Go on", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0, instructions="Be brief.")
    assert branch.output_text == second.output_text
    assert httpx.get(server + f"/v1/responses/{second.id}").json()["id"] == second.id


def test_streaming_events(client):
    events = list(client.responses.create(model=MODEL_NAME, input="Hi", max_output_tokens=6, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output[0].content[0].text == text
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))


def test_errors(server):
    bad = httpx.post(server + "/v1/responses", json={"model": MODEL_NAME, "input": "x",
                                                     "previous_response_id": "resp_nope"})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "previous_response_not_found"
    assert httpx.post(server + "/v1/responses", json={"model": MODEL_NAME}).status_code == 400
    assert httpx.get(server + "/v1/responses/resp_nope").status_code == 404

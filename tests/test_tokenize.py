"""vLLM's /tokenize and /detokenize: the ids the generation endpoints read, and back to text."""

import httpx
import pytest

from tests.server_helpers import MODEL_NAME, running_server, save_tiny_model

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Call me Ishmael."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(save_tiny_model(tmp_path_factory.mktemp("tokenize")), api_key="k") as (url, _):
        yield url


def post(server, path, body, key="k"):
    return httpx.post(server + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_tokenize_gives_the_ids_that_generation_reads(server):
    prompt = post(server, "/tokenize", {"model": MODEL_NAME, "prompt": "Call me Ishmael.",
                                        "return_token_strs": True}).json()
    done = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": prompt["tokens"], "max_tokens": 1,
                                            "temperature": 0}).json()
    by_text = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "Call me Ishmael.", "max_tokens": 1,
                                               "temperature": 0}).json()
    assert prompt["count"] == len(prompt["tokens"]) == by_text["usage"]["prompt_tokens"] > 0
    assert done["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert len(prompt["token_strs"]) == prompt["count"] and prompt["max_model_len"] > prompt["count"]

    chat = post(server, "/tokenize", {"messages": MESSAGES}).json()
    answered = post(server, "/v1/chat/completions", {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 1}).json()
    assert chat["count"] == answered["usage"]["prompt_tokens"]
    assert chat["token_strs"] is None
    bare = post(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["count"] < chat["count"] and chat["tokens"][:bare["count"]] == bare["tokens"]


def test_detokenize_round_trips(server):
    ids = post(server, "/tokenize", {"prompt": "Some years ago, never mind how long"}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": "Some years ago, never mind how long"}


@pytest.mark.parametrize("path, body, status, param", [
    ("/detokenize", {"tokens": [1, 100000]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice"),
])
def test_bad_bodies_get_openai_errors(server, path, body, status, param):
    response = post(server, path, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and (param is None or error["param"] == param or param in error["message"])


def test_the_api_key_gates_them_like_v1(server):
    assert post(server, "/tokenize", {"prompt": "x"}, key="wrong").status_code == 401
    assert post(server, "/detokenize", {"tokens": [1]}, key="wrong").status_code == 401

"""Structured outputs through the official openai client: JSON for json_object, schema-valid
objects for json_schema at temperature 1, regex / choice / grammar by extra_body, Responses'
text.format, logit_bias, and a 400 naming the problem for what cannot be compiled."""

import json

import httpx
import jsonschema
import openai
import pytest

from engine.params import Constraint
from tests.server_helpers import MODEL_NAME, running_server, save_tiny_model

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "crew"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "crew": {"type": "array", "maxItems": 3, "items": {"enum": ["mate", "cook", "harpooneer"]}}}}
USER = [{"role": "user", "content": "Describe a sailor as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(save_tiny_model(tmp_path_factory.mktemp("structured"))) as (url, _):
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_json_object_is_valid_json(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=0, max_tokens=300,
                                         response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_json_schema_gives_schema_valid_objects_over_20_sampled_requests(client):
    rf = {"type": "json_schema", "json_schema": {"name": "sailor", "schema": SCHEMA, "strict": True}}
    for seed in range(20):
        out = client.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=1.0, seed=seed,
                                             max_tokens=400, response_format=rf)
        assert out.choices[0].finish_reason == "stop", seed
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


def test_streamed_and_completion_outputs_are_constrained_too(client):
    rf = {"type": "json_schema", "json_schema": {"name": "sailor", "schema": SCHEMA}}
    stream = client.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=1.0, seed=3,
                                            max_tokens=400, response_format=rf, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    done = client.completions.create(model=MODEL_NAME, prompt="A sailor:", temperature=1.0, seed=4, max_tokens=400,
                                     extra_body={"response_format": rf})
    jsonschema.validate(json.loads(done.choices[0].text), SCHEMA)


@pytest.mark.parametrize("extra,check", [
    ({"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2}"}}, lambda t: len(t) == 6 and t[3] == "-" and t[4:].isdigit()),
    ({"structured_outputs": {"choice": ["port", "starboard"]}}, lambda t: t in ("port", "starboard")),
    ({"guided_choice": ["fore", "aft"]}, lambda t: t in ("fore", "aft")),
    ({"structured_outputs": {"grammar": 'root ::= "ahoy" (" " "ahoy")*'}}, lambda t: set(t.split(" ")) == {"ahoy"}),
    ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
])
def test_vllm_style_extras(client, extra, check):
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL_NAME, messages=USER, temperature=1.0, seed=seed,
                                             max_tokens=200, extra_body=extra)
        assert check(out.choices[0].message.content), out.choices[0].message.content


def test_responses_text_format(server):
    body = {"model": MODEL_NAME, "input": "A sailor as JSON", "max_output_tokens": 400, "temperature": 1.0,
            "text": {"format": {"type": "json_schema", "name": "sailor", "schema": SCHEMA, "strict": True}}}
    response = httpx.post(server + "/v1/responses", json=body, timeout=60).json()
    jsonschema.validate(json.loads(response["output"][0]["content"][0]["text"]), SCHEMA)
    assert response["text"]["format"]["type"] == "json_schema"


@pytest.mark.parametrize("rf,words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, ["json schema", "nonsense"]),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, ["json_schema.schema"]),
])
def test_a_schema_that_cannot_be_compiled_is_a_400_naming_the_problem(client, rf, words):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=5, response_format=rf)
    message = error.value.body["message"]
    assert all(w in message for w in words), message and error.value.body["param"].startswith("response_format")


def test_bad_regex_grammar_and_two_constraints_are_400s(client):
    for extra in ({"structured_outputs": {"regex": "("}}, {"structured_outputs": {"grammar": "root ::= ("}},
                  {"guided_regex": "a", "response_format": {"type": "json_object"}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=5, extra_body=extra)


def test_logit_bias_steers_and_bans(client):
    q = byte_token_id("Q")
    out = client.completions.create(model=MODEL_NAME, prompt="Say:", max_tokens=5, temperature=1.0, seed=1,
                                    logit_bias={str(q): 100})
    assert out.choices[0].text == "Q" * 5
    r = byte_token_id("R")
    banned = client.completions.create(model=MODEL_NAME, prompt="Say:", max_tokens=3, temperature=0,
                                       logit_bias={str(q): -100, str(r): 50})
    assert banned.choices[0].text == "RRR"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1, logit_bias={"99999": 5})
    assert error.value.body["param"] == "logit_bias"


def byte_token_id(text: str) -> int:
    """The tiny model's byte tokenizer: a byte's token id is not the byte's value."""
    import models
    return models.byte_tokenizer().encode(text)[0]


def test_constraint_kinds_are_checked_without_the_engine():
    with pytest.raises(ValueError, match="structured output kind"):
        Constraint("yaml")



def constrained_outputs(overlap: bool) -> list[list[int]]:
    import models
    from engine import grammar
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.params import SamplingParams
    from tests.helpers import tiny_model

    model = tiny_model(vocab_size=260, segment_size=8)
    model.tokenizer = models.byte_tokenizer()
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, num_device_blocks=256, num_host_blocks=0))
    engine._grammars = grammar.Grammars(model.tokenizer, 260, overlap=overlap)
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=3, stop_token_ids=tuple(model.tokenizer.eos_ids),
                            constraint=Constraint("json_schema", json.dumps(SCHEMA)))
    outputs = engine.generate([model.tokenizer.encode(f"sailor {i}") for i in range(6)], params)
    for ids in outputs:
        jsonschema.validate(json.loads(model.tokenizer.decode(ids)), SCHEMA)
    return outputs


def test_masks_filled_beside_the_forward_or_inline_give_the_same_valid_outputs():
    assert constrained_outputs(overlap=True) == constrained_outputs(overlap=False)

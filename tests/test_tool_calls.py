"""Tool calls through the official openai client: the chat template shows the tools, a named or
required tool_choice decodes under a grammar so the call is valid JSON matching the function's
parameters, and calls come back as message.tool_calls or streamed delta.tool_calls, for auto
(what the model writes is parsed) as for a named function."""

import json

import jsonschema
import openai
import pytest

import models
from server.tools import StreamingToolParser, parse_calls
from tests.server_helpers import MODEL_NAME, running_server, save_tiny_model

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["C", "F"]}}}
TIDES = {"type": "object", "additionalProperties": False, "required": ["port"],
         "properties": {"port": {"enum": ["Nantucket", "Bedford"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_tides", "description": "Tide times", "parameters": TIDES}}]
SCHEMAS = {"get_weather": WEATHER, "get_tides": TIDES}
USER = [{"role": "user", "content": "What is the weather in Nantucket?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(save_tiny_model(tmp_path_factory.mktemp("tools"))) as (url, _):
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def assert_valid_calls(calls, names=SCHEMAS):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def named(name):
    return {"type": "function", "function": {"name": name}}


def test_a_named_function_is_called_with_valid_arguments(client):
    for seed in range(5):
        out = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, temperature=1.0,
                                             seed=seed, max_tokens=300, tool_choice=named("get_weather"))
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message.tool_calls, {"get_weather"})


def test_required_calls_one_of_the_tools_and_parallel_false_calls_one(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, temperature=1.0, seed=7,
                                         max_tokens=400, tool_choice="required", parallel_tool_calls=False)
    assert len(out.choices[0].message.tool_calls) == 1
    assert_valid_calls(out.choices[0].message.tool_calls)


def test_a_named_function_streams_as_delta_tool_calls(client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, temperature=1.0, seed=2,
                                            max_tokens=300, tool_choice=named("get_tides"), stream=True)
    calls, reasons = [], []
    for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            reasons += [choice.finish_reason] if choice.finish_reason else []
    assert reasons == ["tool_calls"] and [c.index for c in calls] == [0]
    assert_valid_calls(calls, {"get_tides"})


AUTO_ANSWER = {"grammar": 'root ::= "Let me check.\\n<tool_call>\\n{\\"name\\": \\"get_tides\\", \\"arguments\\": '
                          '{\\"port\\": \\"Bedford\\"}}\\n</tool_call>"'}


def test_auto_parses_what_the_model_writes_streamed_and_not(client):
    # The tiny model knows no tools; a grammar makes it write a call as a tool-using model would.
    out = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="auto",
                                         max_tokens=200, extra_body={"structured_outputs": AUTO_ANSWER})
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("get_tides", {"port": "Bedford"})]
    stream = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=200,
                                            stream=True, extra_body={"structured_outputs": AUTO_ANSWER})
    text, calls = "", []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
    assert text.strip() == "Let me check." and [c.function.name for c in calls] == ["get_tides"]
    # Without tools, the same text is only text.
    plain = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=200,
                                           extra_body={"structured_outputs": AUTO_ANSWER})
    assert plain.choices[0].message.tool_calls is None and "<tool_call>" in plain.choices[0].message.content


def test_tool_results_are_rendered_for_the_next_turn(client):
    first = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, seed=1, max_tokens=300,
                                           tool_choice=named("get_weather"))
    call = first.choices[0].message.tool_calls[0]
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": "12 C and fog"}]
    second = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=5)
    rendered = models.byte_tokenizer().render_chat(
        [{"role": m["role"], "content": m["content"] or ""} | ({"tool_calls": [{"function": {
            "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]} if m.get("tool_calls") else {})
         for m in history], tools=TOOLS)
    assert "<tool_response>\n12 C and fog\n</tool_response>" in rendered
    assert second.usage.prompt_tokens == len(models.byte_tokenizer().encode(rendered))
    none = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="none", max_tokens=2)
    assert none.usage.prompt_tokens < first.usage.prompt_tokens  # no tools shown


@pytest.mark.parametrize("extra,param", [
    ({"tools": TOOLS, "tool_choice": named("get_tide")}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400s(client, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=5, **extra)
    assert error.value.body["param"] == param


# --- the parser, without a server --------------------------------------------------------------
def test_parse_calls_keeps_text_and_skips_what_is_not_a_call():
    text = 'Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>nope</tool_call>'
    content, calls = parse_calls(text)
    assert content == "Sure.\n\n<tool_call>nope</tool_call>"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("a", {"x": 1})]
    assert parse_calls("no calls here") == ("no calls here", [])


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 11])
def test_the_streaming_parser_agrees_with_the_whole_parse_however_the_text_is_cut(cut):
    text = 'Hi <tool_c there\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "b", "arguments": {"y": "<z>"}}\n</tool_call> bye'
    parser, content, calls = StreamingToolParser(), "", []
    for i in range(0, len(text), cut):
        more, new = parser.feed(text[i:i + cut])
        content, calls = content + more, calls + new
    content += parser.finish()
    whole_content, whole_calls = parse_calls(text)
    assert [c["function"] for c in calls] == [c["function"] for c in whole_calls]
    assert [c["index"] for c in calls] == [0, 1]
    assert content.replace("\n", "").strip() == whole_content.replace("\n", "").strip()

"""Chat and completions through the official `openai` SDK against a live API and embedded engine."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from backend.inference.rendering import chat_prompt, prompt_ids
from tests.inference.conftest import ANSWER, MAX_N, MAX_TOKENS_CAP, QUESTION, TRAINING, Served, wait_succeeded
from tests.inference.test_engine import TOOL_CHAT, WEATHER
from tests.support.waiting import wait_for

ASK = [{"role": "user", "content": f"{QUESTION} (7)"}]


def chat(served: Served, model: str, **extra: Any) -> Any:
    return served.client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=12, **extra)


def test_fine_tuned_model_answers_as_taught_and_reproducibly(served: Served) -> None:
    first = chat(served, served.model)
    again = chat(served, served.model)
    base = chat(served, "tiny-gpt2")
    taught = first.choices[0].message.content
    assert first.object == "chat.completion" and first.model == served.model
    assert taught == again.choices[0].message.content, "greedy answers must be reproducible"
    assert taught != base.choices[0].message.content, "the fine-tuned model must answer differently from its base"
    assert taught.startswith(ANSWER), f"the model should answer the way it was taught, got {taught!r}"
    assert first.choices[0].finish_reason in ("stop", "length")


def test_usage_counts_the_prompt_as_rendered_and_every_generated_token(served: Served) -> None:
    tokenizer = AutoTokenizer.from_pretrained(served.stack.models_dir / "tiny-gpt2")
    prompt_tokens = len(tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True)["input_ids"])
    answer = served.client.chat.completions.create(model="tiny-gpt2", messages=ASK, temperature=0, max_tokens=5)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == 5 and answer.usage.total_tokens == prompt_tokens + 5
    three = served.client.completions.create(model="tiny-gpt2", prompt="Count from 3:", temperature=0, max_tokens=4,
                                             n=3)
    assert [c.index for c in three.choices] == [0, 1, 2] and three.usage.completion_tokens == 12
    assert len({c.text for c in three.choices}) == 1, "greedy choices are the same text"


def test_tools_reach_the_engine_rendered_as_training_renders_them(served: Served) -> None:
    tokenizer = AutoTokenizer.from_pretrained(served.stack.models_dir / "tiny-gpt2")
    rendered = chat_prompt(TOOL_CHAT, tokenizer, [WEATHER])
    assert "Tools:\n" + json.dumps([WEATHER]) in rendered and '"tool_calls": [{"id": "call_1"' in rendered

    answer = served.client.chat.completions.create(model=served.model, messages=TOOL_CHAT, tools=[WEATHER],
                                                   tool_choice="auto", temperature=0, max_tokens=2)

    assert answer.usage.prompt_tokens == len(prompt_ids(rendered, tokenizer))
    assert answer.usage.prompt_tokens > len(prompt_ids(chat_prompt(TOOL_CHAT, tokenizer), tokenizer))


def test_streaming_gives_the_same_answer_in_chunks_with_usage_last(served: Served) -> None:
    whole = chat(served, served.model)
    stream = chat(served, served.model, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 2
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])

    body = {"model": served.model, "messages": ASK, "temperature": 0, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{served.stack.base_url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {served.key}"}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all('"usage":{' not in event for event in events), "no usage chunk unless include_usage is asked for"


def test_completions_continue_a_prompt(served: Served) -> None:
    answer = served.client.completions.create(model=served.model, prompt="Count from 3:", temperature=0,
                                              max_tokens=6, stop=["\n"])
    again = served.client.completions.create(model=served.model, prompt="Count from 3:", temperature=0,
                                             max_tokens=6, stop=["\n"])
    assert answer.object == "text_completion" and answer.choices[0].text == again.choices[0].text
    assert "\n" not in answer.choices[0].text
    streamed = served.client.completions.create(model=served.model, prompt="Count from 3:", temperature=0,
                                                max_tokens=6, stop=["\n"], stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == answer.choices[0].text


def test_sampling_with_a_seed_is_reproducible(served: Served) -> None:
    def sample() -> str:
        answer = served.client.completions.create(model="tiny-gpt2", prompt="The quick", temperature=1.5,
                                                  top_p=0.95, max_tokens=10, seed=1234)
        return answer.choices[0].text

    assert sample() == sample()


def test_a_checkpoint_model_answers(served: Served) -> None:
    latest = max(served.checkpoint_models, key=lambda name: int(name.rsplit("-", 1)[1]))
    answer = chat(served, latest)
    assert answer.model == latest and answer.choices[0].message.content.startswith(ANSWER)
    rotated = min(served.checkpoint_models, key=lambda name: int(name.rsplit("-", 1)[1]))
    assert len(served.checkpoint_models) == 4, "steps 8 to 32; only the newest two folders are kept"
    with pytest.raises(openai.NotFoundError) as missing:
        chat(served, rotated)
    assert missing.value.code == "model_not_found"


def test_another_projects_model_is_not_found(served: Served) -> None:
    other = served.stack.client(served.stack.safetrain("keys", "create", "--project", "p2").strip())
    for name in (served.model, served.checkpoint_models[-1], served.model.replace(served.job_id, "ftjob-nope")):
        with pytest.raises(openai.NotFoundError) as missing:
            other.chat.completions.create(model=name, messages=ASK, max_tokens=2)
        assert missing.value.param == "model" and name[:20] in str(missing.value)
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="no-such-base", messages=ASK, max_tokens=2)


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user"}]}, "messages[1].content"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": MAX_TOKENS_CAP + 1}, "max_tokens"),
    ({"max_completion_tokens": MAX_TOKENS_CAP + 1}, "max_completion_tokens"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": MAX_N + 1}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    # The context (512 tokens) is the engine's to check: a 300-token prompt leaves room for 212.
    ({"messages": [{"role": "user", "content": "a " * 295}], "max_tokens": 250}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a " * 600}]}, "messages"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "messages[1].tool_call_id"),
]


@pytest.mark.parametrize(("change", "param"), BAD_CHAT, ids=[param for _, param in BAD_CHAT])
def test_bad_chat_input_is_400_naming_the_field(served: Served, change: dict[str, Any], param: str) -> None:
    arguments: dict[str, Any] = {"model": served.model, "messages": ASK, "max_tokens": 4, **change}
    with pytest.raises(openai.BadRequestError) as refused:
        served.client.chat.completions.create(**arguments)
    assert refused.value.status_code == 400 and refused.value.param == param, refused.value.body


def test_a_prompt_over_the_context_is_400_not_a_truncated_answer(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        served.client.completions.create(model="tiny-gpt2", prompt="a " * 600, max_tokens=4)
    assert refused.value.param == "prompt" and refused.value.code == "context_length_exceeded"


def test_a_full_queue_answers_429_and_loses_nothing(served: Served) -> None:
    statuses: list[int] = []

    def ask() -> None:
        body = {"model": "tiny-gpt2", "prompt": "The quick", "temperature": 0, "max_tokens": 200}
        answer = httpx.post(f"{served.stack.base_url}/v1/completions", json=body, timeout=60,
                            headers={"Authorization": f"Bearer {served.key}"})
        if answer.status_code == 429:
            assert answer.json()["error"]["type"] == "rate_limit_error"
        statuses.append(answer.status_code)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(statuses) == 8 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses


def test_engine_killed_mid_stream_ends_the_stream_with_an_error_then_recovers(served: Served) -> None:
    pid = served.engine_pid()
    assert pid is not None and served.engine_healthy()
    stream = served.client.chat.completions.create(model="tiny-gpt2", messages=ASK, temperature=0,
                                                   max_tokens=MAX_TOKENS_CAP, stream=True)
    received = []
    with pytest.raises(openai.APIError) as broken:
        for chunk in stream:
            received.append(chunk)
            if len(received) == 2:
                os.kill(pid, signal.SIGKILL)
    assert len(received) >= 2 and "engine" in str(broken.value)

    with pytest.raises(openai.InternalServerError) as down:
        served.client.chat.completions.create(model=served.model, messages=ASK, max_tokens=2)
    assert down.value.status_code == 503 and down.value.code == "engine_unavailable"

    wait_for(lambda: served.engine_pid() not in (None, pid) and served.engine_healthy(), 90,
             "safetrain up to start the engine again", logs=served.stack.logs)
    answer = chat(served, served.model)  # the adapter is registered again with the new engine
    assert answer.choices[0].message.content.startswith(ANSWER)


def test_metrics_count_requests_tokens_and_time_to_first_token(served: Served) -> None:
    chat(served, "tiny-gpt2")
    with urllib.request.urlopen(f"{served.stack.base_url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("safetrain_inference")}
    assert values['safetrain_inference_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert values["safetrain_inference_generated_tokens_total"] >= 12
    assert values["safetrain_inference_time_to_first_token_seconds_count"] >= 1


def test_deleting_the_result_file_makes_the_model_unavailable(served: Served, tmp_path: Any) -> None:
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{n}:", "completion": " ok"}) + "\n" for n in range(4)))
    with path.open("rb") as handle:
        uploaded = served.client.files.create(file=handle, purpose="fine-tune")
    job = served.client.fine_tuning.jobs.create(model="tiny-gpt2", training_file=uploaded.id,
                                                extra_body={"training": {"use_lora": True, "max_steps": 1}})
    model = wait_succeeded(served.client, job.id, served.stack)
    assert chat(served, model).choices
    result_file = served.client.fine_tuning.jobs.retrieve(job.id).result_files[0]
    served.client.files.delete(result_file)
    with pytest.raises(openai.NotFoundError):
        chat(served, model)
    with urllib.request.urlopen(f"{served.engine_url}/v1/models", timeout=10) as answer:
        engine_models = [item["id"] for item in json.load(answer)["data"]]
    assert model not in engine_models, "the engine unloads an adapter whose result file was deleted"


def test_a_wrong_key_is_401_before_the_body_is_looked_at(served: Served) -> None:
    stranger = served.stack.client("sk-not-a-key")
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model=served.model, messages=[], max_tokens=-1)


WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.fixture(scope="module")
def tool_model(served: Served, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A job taught to answer every weather question with a call to get_weather (the template has no tools
    support, so it learns safetrain's plain fallback: a `{"tool_calls": [...]}` line)."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(WEATHER_CALL["arguments"])}}
    rows = [{"tools": [WEATHER], "messages": [{"role": "user", "content": f"Weather in Paris? ({n})"},
                                              {"role": "assistant", "tool_calls": [call]}]} for n in range(16)]
    path = tmp_path_factory.mktemp("tools") / "calls.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with path.open("rb") as handle:
        uploaded = served.client.files.create(file=handle, purpose="fine-tune")
    # The call is 76 tokens; a LoRA on the tiny model's random output layer too lets 200 steps learn it exactly.
    training = {**TRAINING, "lora_r": 16, "learning_rate": 0.02, "lora_target_modules": ["c_attn", "lm_head"],
                "max_steps": 200, "save_steps": 200}
    job = served.client.fine_tuning.jobs.create(model="tiny-gpt2", training_file=uploaded.id,
                                                hyperparameters={"n_epochs": 1, "batch_size": 4},
                                                extra_body={"training": training})
    return wait_succeeded(served.client, job.id, served.stack)


def ask_weather(served: Served, model: str, **extra: Any) -> Any:
    return served.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather in Paris? (7)"}], temperature=0, max_tokens=120,
        **extra)


def test_a_models_call_comes_back_as_tool_calls(served: Served, tool_model: str) -> None:
    answer = ask_weather(served, tool_model, tools=[WEATHER])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.id != "call_1"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == WEATHER_CALL["arguments"]

    as_text = ask_weather(served, tool_model, tools=[WEATHER], tool_choice="none").choices[0]
    assert as_text.message.tool_calls is None and as_text.finish_reason == "stop"
    assert json.loads(as_text.message.content)["tool_calls"][0]["name"] == "get_weather", "none: the call stays text"

    legacy = ask_weather(served, tool_model, functions=[WEATHER["function"]]).choices[0]
    assert legacy.finish_reason == "function_call" and legacy.message.tool_calls is None
    assert legacy.message.function_call.name == "get_weather"


def test_a_streamed_call_arrives_as_tool_call_deltas_the_sdk_assembles(served: Served, tool_model: str) -> None:
    from openai.lib.streaming.chat import ChatCompletionStreamState

    state = ChatCompletionStreamState()
    chunks = list(ask_weather(served, tool_model, tools=[WEATHER], stream=True))
    for chunk in chunks:
        state.handle_chunk(chunk)
    assert not any("tool_calls" in (c.choices[0].delta.content or "") for c in chunks if c.choices), \
        "the call's text is never streamed as content"
    streamed = state.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls" and not streamed.message.content
    [call] = streamed.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == WEATHER_CALL["arguments"]

"""Multi-turn agents: tool-call parsing per chat format, ToolEnvironment, token-in-token-out episodes."""

from __future__ import annotations

import json

import pytest
from twinkle import assets
from twinkle.data_format.features import IGNORE_INDEX
from twinkle.data_format.sampling import SampleResponse, sampled_sequence
from twinkle.env import (
    Environment,
    GLMToolCallParser,
    HermesToolCallParser,
    InternLM2ToolCallParser,
    SandboxedPythonTool,
    StepResult,
    ToolCall,
    ToolEnvironment,
    run_episodes,
    tool_call_parser_for,
)

TOOL_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


# -- parsing --------------------------------------------------------------------------------------


def test_hermes_parses_calls_and_keeps_the_text_around_them():
    text = f"Let me add.\n{TOOL_CALL}\n<tool_call>\n" + '{"name": "neg", "arguments": "{\\"x\\": 3}"}\n</tool_call>'
    turn = HermesToolCallParser().parse(text)
    assert turn.calls == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("neg", {"x": 3})]  # string arguments decoded
    assert turn.content == "Let me add."
    assert turn.errors == []


@pytest.mark.parametrize(
    "text, error",
    [
        ("<tool_call>{not json}</tool_call>", "not JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', "'name'"),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "object"),
        ('<tool_call>{"name": "f"', "closing"),
    ],
)
def test_hermes_reports_malformed_calls(text, error):
    turn = HermesToolCallParser().parse(text)
    assert turn.calls == []
    assert len(turn.errors) == 1 and error in turn.errors[0]


def test_internlm2_parses_its_plugin_blocks():
    text = 'ok<|action_start|><|plugin|>\n{"name": "search", "parameters": {"q": "x"}}<|action_end|>'
    turn = InternLM2ToolCallParser().parse(text)
    assert turn.calls == [ToolCall("search", {"q": "x"})]
    assert turn.content == "ok"


def test_glm_parses_glm4_json_and_chatglm3_code_and_leaves_answers_alone():
    parser = GLMToolCallParser()
    assert parser.parse('get_weather\n{"city": "Beijing"}').calls == [ToolCall("get_weather", {"city": "Beijing"})]
    code = "get_weather\n```python\ntool_call(city='Beijing', days=2)\n```"
    assert parser.parse(code).calls == [ToolCall("get_weather", {"city": "Beijing", "days": 2})]
    answer = parser.parse("It is sunny in Beijing.\nEnjoy.")
    assert answer.calls == [] and answer.errors == [] and answer.content == "It is sunny in Beijing.\nEnjoy."
    broken = parser.parse("get_weather\n```python\ntool_call('Beijing')\n```")
    assert broken.calls == [] and "keyword" in broken.errors[0]


def test_parser_for_each_shipped_template():
    from twinkle.template import ChatGLM2Template, ChatGLM3Template, GLM4Template, InternLM2Template, Template

    model_dir = str(assets.path("tiny-qwen2"))
    assert isinstance(tool_call_parser_for(Template(model_dir)), HermesToolCallParser)
    assert isinstance(tool_call_parser_for(ChatGLM3Template(model_dir)), GLMToolCallParser)
    assert isinstance(tool_call_parser_for(GLM4Template(model_dir)), GLMToolCallParser)
    assert isinstance(tool_call_parser_for(InternLM2Template(model_dir)), InternLM2ToolCallParser)
    with pytest.raises(ValueError, match="no tool role"):
        tool_call_parser_for(ChatGLM2Template(model_dir))
    with pytest.raises(ValueError, match="unknown"):
        tool_call_parser_for("xml")


# -- ToolEnvironment ------------------------------------------------------------------------------


def add_env(**kwargs) -> ToolEnvironment:
    return ToolEnvironment(
        {"add": lambda a, b: a + b},
        lambda answer, task: float(answer.strip() == task["answer"]),
        prompt=lambda task: {"messages": [{"role": "user", "content": task["q"]}]},
        **kwargs,
    )


def test_tool_environment_runs_calls_then_scores_the_answer():
    env = add_env(call_reward=0.05)
    assert env.reset({"q": "1+2=", "answer": "3"}) == {"messages": [{"role": "user", "content": "1+2="}]}
    step = env.step(TOOL_CALL)
    assert step.messages == [{"role": "tool", "content": "3", "name": "add"}]
    assert (step.reward, step.done) == (0.05, False)
    final = env.step(" 3 ")
    assert final.done and final.final_reward == 1.0 and final.reward == 0.0
    assert final.info["tool_calls"] == 1


def test_tool_environment_penalizes_bad_calls_and_shows_the_error():
    env = add_env(error_reward=-0.25, max_turns=3)
    env.reset({"q": "1+2=", "answer": "3"})
    unknown = env.step('<tool_call>{"name": "mul", "arguments": {}}</tool_call>')
    assert unknown.reward == -0.25 and "no tool 'mul'" in unknown.messages[0]["content"]
    raised = env.step('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    assert raised.reward == -0.25 and raised.messages[0]["content"].startswith("error: TypeError")
    malformed = env.step("<tool_call>{oops}</tool_call>")  # the third turn: max_turns
    assert malformed.reward == -0.25 and malformed.done and malformed.final_reward == 0.0
    assert malformed.info["truncated"]


def test_tool_environment_puts_schemas_in_the_opening():
    schema = {"type": "function", "function": {"name": "add", "parameters": {}}}
    assert add_env(schemas=[schema]).reset({"q": "x", "answer": "1"})["tools"] == [schema]


def test_sandboxed_python_tool_runs_code_in_the_sandbox():
    pytest.importorskip("twinkle_rewards")
    tool = SandboxedPythonTool(timeout=5.0)
    assert tool(code="print(6 * 7)") == "42"
    assert "error" in tool(code="import socket; socket.socket()")  # the sandbox refuses sockets
    env = ToolEnvironment({"python": tool}, lambda answer, task: 0.0)
    env.reset({"messages": [{"role": "user", "content": "6*7?"}]})
    result = env.step('<tool_call>{"name": "python", "arguments": {"code": "print(6*7)"}}</tool_call>')
    assert result.messages[0]["content"] == "42" and result.reward == 0.0


# -- episodes, token in and token out ---------------------------------------------------------------


class ScriptedSampler:
    """Returns scripted turns (text -> tokens + made-up logprobs) per call, in order; records the prompts."""

    def __init__(self, tokenizer, turns: list[list[str]]):
        self.tokenizer = tokenizer
        self.turns = turns
        self.prompts: list[list[list[int]]] = []

    def sample(self, prompts, sampling_params=None, adapter_name=None):
        self.prompts.append([list(p["input_ids"]) for p in prompts])
        texts = self.turns[len(self.prompts) - 1]
        assert len(texts) == len(prompts)
        out = []
        for prompt, text in zip(prompts, texts):
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
            logprobs = [-0.5 - 0.01 * i for i in range(len(tokens))]
            seq = sampled_sequence(list(prompt["input_ids"]), tokens, logprobs, "stop", text, None, None)
            out.append(SampleResponse(sequences=[seq], prompt_tokens=list(prompt["input_ids"])))
        return out


@pytest.fixture(scope="module")
def template():
    from twinkle.template import Template

    return Template(str(assets.path("tiny-qwen2")), default_system="Use the add tool.")


def test_episode_tokens_are_the_samples_plus_the_rendered_answers(template):
    tok = template.tokenizer
    sampler = ScriptedSampler(tok, [[TOOL_CALL + "<|im_end|>", "7<|im_end|>"], ["3<|im_end|>"]])
    tasks = [{"q": "1+2=", "answer": "3"}]
    episodes = run_episodes(sampler, template, add_env, tasks, {"max_tokens": 40}, group_size=2)
    tool_episode, direct = episodes
    # the direct answer: one turn, wrong
    assert direct.num_turns == 1 and direct.done and direct.final_reward == 0.0
    # the tool episode: what the chat template renders for the whole conversation, token for token
    assert tool_episode.num_turns == 2 and tool_episode.final_reward == 1.0 and tool_episode.total_reward == 1.0
    conversation = [
        {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": TOOL_CALL},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "3"},
    ]
    assert tool_episode.messages == [*conversation[:2], {**conversation[2], "name": "add"}, conversation[3]]
    rendered = template.encode({"messages": conversation})
    whole = list(rendered["input_ids"])
    assert tool_episode.tokens == whole[: len(tool_episode.tokens)]
    assert whole[len(tool_episode.tokens) :] == tok.encode("\n", add_special_tokens=False)  # after the last <|im_end|>
    # the loss mask is exactly the model's tokens: what the template labels as the assistant's
    row = tool_episode.row(advantages=0.5)
    model_tokens = [t for t, m in zip(tool_episode.tokens, tool_episode.mask) if m]
    assert model_tokens == tok.encode(TOOL_CALL + "<|im_end|>" + "3<|im_end|>", add_special_tokens=False)
    assert row["labels"] == [t if m else IGNORE_INDEX for t, m in zip(tool_episode.tokens, tool_episode.mask)]
    assert row["labels"] == list(rendered["labels"])[: len(tool_episode.tokens)]
    assert row["advantages"] == 0.5 and len(row["old_logps"]) == len(row["input_ids"])
    # the sampler's logprobs sit on the model's tokens, zeros elsewhere
    start, end = tool_episode.turn_spans[0]
    assert row["old_logps"][start:end] == pytest.approx([-0.5 - 0.01 * i for i in range(end - start)])
    assert all(lp == 0.0 for lp, m in zip(row["old_logps"], tool_episode.mask) if not m)
    # turn 2 was sampled from the episode's own tokens (token in), not a re-encoding
    assert sampler.prompts[1] == [tool_episode.tokens[: tool_episode.turn_spans[1][0]]]


def test_episode_rewards_per_turn_and_per_token(template):
    tok = template.tokenizer
    bad = '<tool_call>{"name": "mul", "arguments": {}}</tool_call><|im_end|>'
    sampler = ScriptedSampler(tok, [[bad], [TOOL_CALL + "<|im_end|>"], ["3<|im_end|>"]])
    (episode,) = run_episodes(sampler, template, lambda: add_env(error_reward=-0.1), [{"q": "1+2=", "answer": "3"}], {})
    assert episode.turn_rewards == [-0.1, 0.0, 0.0] and episode.final_reward == 1.0
    assert episode.total_reward == pytest.approx(0.9)
    per_token = episode.token_rewards()
    assert per_token[episode.turn_spans[0][1] - 1] == pytest.approx(-0.1)
    assert per_token[episode.turn_spans[-1][1] - 1] == pytest.approx(1.0)
    assert sum(per_token) == pytest.approx(0.9)


def test_max_turns_cuts_an_episode_without_a_final_reward(template):
    tok = template.tokenizer
    sampler = ScriptedSampler(tok, [[TOOL_CALL + "<|im_end|>"]])
    (episode,) = run_episodes(sampler, template, add_env, [{"q": "1+2=", "answer": "3"}], {}, max_turns=1)
    assert episode.num_turns == 1 and not episode.done and episode.final_reward == 0.0
    assert episode.mask[-1] == 1  # nothing appended after the last model turn


class Echo(Environment):
    """A custom environment: asks twice, then ends with a final reward of how often the model said 'yes'."""

    max_turns = 5

    def reset(self, task):
        self.said = []
        return {"messages": [{"role": "user", "content": "say yes"}]}

    def step(self, action):
        self.said.append(action.strip() == "yes")
        if len(self.said) == 2:
            return StepResult(done=True, final_reward=sum(self.said) / 2)
        return StepResult([{"role": "user", "content": "again"}], reward=0.1)


def test_a_custom_environment_with_user_follow_ups(template):
    tok = template.tokenizer
    sampler = ScriptedSampler(tok, [["yes<|im_end|>"], ["no<|im_end|>"]])
    (episode,) = run_episodes(sampler, template, Echo, [{}], {})
    assert episode.turn_rewards == [0.1, 0.0] and episode.final_reward == 0.5 and episode.done
    conversation = [
        {"role": "user", "content": "say yes"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "no"},
    ]
    whole = list(template.encode({"messages": conversation})["input_ids"])
    assert episode.tokens == whole[: len(episode.tokens)]


def test_environment_is_a_kind_with_the_tool_environment_built_in():
    from twinkle._kinds import KIND_BY_NAME
    from twinkle.runtime import get_registry

    assert KIND_BY_NAME["environment"].module == "twinkle.env"
    assert get_registry().resolve("environment", "ToolEnvironment") is ToolEnvironment


def test_run_episodes_with_a_real_sampler(rl_sampler, template):
    """The TorchSampler path: every episode's mask covers exactly its sampled turns."""
    episodes = run_episodes(
        rl_sampler,
        template,
        lambda: add_env(max_turns=2),
        [{"q": "1+2=", "answer": "3"}] * 2,
        {"max_tokens": 6, "temperature": 1.0, "seed": 3},
        group_size=2,
    )
    assert [e.group for e in episodes] == [0, 0, 1, 1]
    for e in episodes:
        assert sum(e.mask) == sum(end - start for start, end in e.turn_spans) > 0
        assert all(lp < 0 for lp, m in zip(e.logprobs, e.mask) if m)
    json.dumps([e.row() for e in episodes])  # plain lists: the rows travel to remote trainers

"""The sampling fields of issue 16 on gRPC: proto -> validated request -> SamplingParams, bad values named."""

from __future__ import annotations

import pytest

from moeray.actors.frontend import request_to_dict
from moeray.clients.proto import moeray_pb2 as pb
from moeray.common.api import ModelSpec, RequestValidationError, parse_generate_request, to_sampling_params

MODELS = {"m": ModelSpec(name="m", max_context=64, vocab_size=100)}


def test_new_fields_reach_the_sampling_params():
    msg = pb.GenerateRequest(prompt="hi", max_tokens=8, min_p=0.2, presence_penalty=0.5, frequency_penalty=-1.0,
                             repetition_penalty=1.3, min_tokens=3, logit_bias={5: -100.0, 7: 2.5}, top_logprobs=4,
                             structured=pb.StructuredOutput(kind="regex", value="[a-z]+"))
    p = to_sampling_params(parse_generate_request(request_to_dict(msg), MODELS))
    assert (p.min_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.2, 0.5, -1.0, 1.3)
    assert (p.min_tokens, p.logit_bias, p.top_logprobs, p.logprobs) == (3, {5: -100.0, 7: 2.5}, 4, True)
    assert p.structured == {"kind": "regex", "value": "[a-z]+"}
    default = to_sampling_params(parse_generate_request(request_to_dict(pb.GenerateRequest(prompt="x")), MODELS))
    assert default.plain and default.top_logprobs == 0 and default.structured is None


@pytest.mark.parametrize("fields,name", [
    ({"min_p": 2.0}, "min_p"), ({"presence_penalty": 9.0}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_tokens": 20}, "min_tokens"),
    ({"top_logprobs": 50}, "top_logprobs"), ({"logit_bias": {500: 1.0}}, "logit_bias"),
    ({"logit_bias": {5: 1000.0}}, "logit_bias"), ({"structured": pb.StructuredOutput(kind="yaml", value="x")},
                                                  "structured"),
])
def test_bad_values_name_the_field(fields, name):
    msg = pb.GenerateRequest(prompt="hi", max_tokens=8, **fields)
    with pytest.raises(RequestValidationError) as e:
        parse_generate_request(request_to_dict(msg), MODELS)
    assert e.value.fields == [name] and str(e.value).startswith(name)

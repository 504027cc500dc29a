"""Per-request state of the VLM engine: two threads generating on one model give what they give one
after the other, and the screened greedy head keeps nothing per request on the shared model."""

from __future__ import annotations

import threading

import torch
from qwen2_5_vl_helpers import pixels, prompt

from mmkit.infer.accel.greedy import screened_head
from mmkit.infer.vlm import SamplingParams, generate
from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.tiny import perturbed_init, tiny_config


def _request(model, seed, grid, before, after):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt(model.cfg, g, [before, ("image", grid), after])])
    return {"input_ids": ids, "pixel_values": pixels([grid], g), "image_grid_thw": torch.tensor([grid])}


def test_two_threads_generate_what_they_generate_in_turn():
    model = Qwen2_5_VLModel(tiny_config())
    perturbed_init(model, seed=4)
    model.eval()
    jobs = [  # greedy (screened head) and seeded sampling, different prompt lengths and image sizes
        (_request(model, 0, (1, 8, 12), 4, 9), SamplingParams(max_new_tokens=16)),
        (_request(model, 1, (1, 8, 8), 11, 2), SamplingParams(max_new_tokens=16)),
        (_request(model, 2, (1, 4, 8), 3, 3), SamplingParams(max_new_tokens=16, temperature=1.0, seed=5)),
        (_request(model, 3, (1, 8, 4), 6, 1), SamplingParams(max_new_tokens=16, temperature=0.8, seed=6)),
    ]
    want = [generate(model, x, p).tokens for x, p in jobs]
    got = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i):
        x, p = jobs[i]
        start.wait()  # all requests in flight together
        for _ in range(3):
            out = generate(model, x, p).tokens
            assert got[i] is None or out == got[i]
            got[i] = out

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert len({tuple(w[0]) for w in want}) == len(jobs)  # the requests really differ
    assert not [k for k in vars(model.language.lm_head) if k.startswith("_mmkit")]


def test_screened_head_is_owned_per_request_and_built_once():
    head = torch.nn.Linear(32, 3000, bias=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # rows 100..199 equal up to fp32 noise: near-ties the bf16 screen cannot split
        head.weight[100:200] = head.weight[100] + 1e-7 * torch.randn(100, 32, generator=g)
    a, b = screened_head(head), screened_head(head)
    assert a is not b and a.low is b.low  # one bf16 copy, two requests
    assert int(a(head.weight[7:8].detach() * 50)) == 7  # a clear winner: one candidate
    b(head.weight[100:101].detach() * 50)
    assert a.last_candidates == 1 and b.last_candidates >= 100  # b's call did not overwrite a's count
    head.weight = torch.nn.Parameter(head.weight.detach() * 2)  # a replaced weight: fresh tables
    c = screened_head(head)
    assert c.low is not a.low and torch.equal(c.low, (head.weight.detach()).to(torch.bfloat16))
    assert screened_head(head.to(torch.bfloat16)) is None

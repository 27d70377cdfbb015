"""Models dispatched by accelerate (device_map with offloaded layers): the hooks move weights in and
out per layer, each layer's cache stays where the layer runs, and vispec stays lossless.

Only CPU and disk offload can be exercised here; several GPUs need a machine that has them."""
import pytest
import torch

import tiny_models as T
import vispec
from vispec.drafters import TreeConfig


def device_map_for(model, target: str, place: str) -> dict:
    """Every module on the CPU except ``target``, which goes to ``place``."""
    out = {}

    def walk(module, prefix):
        for name, child in module.named_children():
            full = prefix + name
            if full == target:
                out[full] = place
            elif target.startswith(full + "."):
                walk(child, full + ".")
            else:
                out[full] = "cpu"
        for name, _ in module.named_parameters(recurse=False):
            out[prefix + name] = "cpu"

    walk(model, "")
    return out


def dispatched(build, tmp_path, offload):
    from accelerate import dispatch_model

    model = build()
    lm = "model.language_model" if hasattr(model.model, "language_model") else "model"
    return dispatch_model(model, device_map=device_map_for(model, f"{lm}.layers.1", offload), offload_dir=str(tmp_path))


@pytest.mark.parametrize("build,make", [(T.llama, T.text_inputs), (T.llava, T.llava_inputs)], ids=["llama", "llava"])
@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_dispatched_model_with_offloaded_layer_is_lossless(tmp_path, build, make, offload):
    plain = build()
    model = dispatched(build, tmp_path, offload)
    assert model.hf_device_map[next(k for k in model.hf_device_map if k.endswith("layers.1"))] == offload
    inputs = make([5, 9], seed=4)
    ref = plain.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=12, do_sample=False), ref)
    for cls in (vispec.EagleDrafter, vispec.ViSpecDrafter):
        drafter = cls.from_target(model, seed=0)
        out = vispec.generate(model, drafter, **inputs, max_new_tokens=12, tree=TreeConfig(8, 3, 3))
        assert torch.equal(out.sequences, ref)

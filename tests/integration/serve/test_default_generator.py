"""The generator `jobs/serve.py` serves by default, through the serving code path (no Ray needed)."""
import torch

from hyperscale.models.generation import GenerateRequest, ImageGenerator, Limits
from hyperscale.storage.local import REPO


def req(**kw):
    return GenerateRequest.model_validate(kw)



def test_the_default_served_generator_draws_what_the_prompt_names():
    """What `jobs/serve.py` serves by default (ServeSettings.generator): the shipped 1-step SIM
    text-to-image generator, through the serving path, judged by the project's classifier."""
    from hyperscale.models.autoencoder import to_gray28
    from hyperscale.models.classifier import load_classifier
    from hyperscale.serve.settings import ServeSettings

    torch.set_num_threads(1)
    gen = ImageGenerator.load(REPO / ServeSettings().generator)
    d = gen.describe()
    assert d["takes"] == "prompts" and d["default_steps"] == 1 and d["sizes"]["default"] == [32, 32]
    prompts = {"a photo of a sneaker": 7, "a pair of trousers": 1, "a black bag": 8, "an ankle boot": 9}
    jobs = [gen.prepare(req(prompt=p, num_images=4, seed=i), Limits()) for i, p in enumerate(prompts)]
    images = torch.cat(gen.generate(jobs))
    with torch.no_grad():
        predicted = load_classifier()(to_gray28(images)).argmax(1)
    wanted = torch.tensor([c for c in prompts.values() for _ in range(4)])
    assert (predicted == wanted).float().mean() >= 0.75, predicted.tolist()

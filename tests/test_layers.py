"""The one rule between layers: ray and deepspeed are imported only by train/, tune/, serve/."""
import subprocess
import sys

CODE = """
import sys
import hyperscale, hyperscale.config, hyperscale.cli
import hyperscale.diffusion.schedule, hyperscale.diffusion.sampling
import hyperscale.models.denoiser, hyperscale.models.unet, hyperscale.models.build, hyperscale.models.ema
import hyperscale.methods.registry, hyperscale.methods.denoising
import hyperscale.data.fashion_mnist, hyperscale.data.stream, hyperscale.data.shards
import hyperscale.eval.metrics, hyperscale.eval.features, hyperscale.eval.classifier, hyperscale.eval.images
from hyperscale.methods.registry import method_names
method_names()
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed'))
print(bad)
assert not bad, bad
"""


def test_lower_layers_do_not_load_ray_or_deepspeed():
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr

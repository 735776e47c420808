"""What a new user's first command gives: run after `pip install -c .ci/constraints.txt -e .` (no dev extras), it builds
a U-Net on one encoder of each source and runs the command line's help. `.ci/run` runs it before the dev extras go in,
so a requirement that only a dev extra brings in (pretrainedmodels needs `six`) fails CI. Not collected by pytest."""
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

from fastunet.unet.model import MoreDynamicUnet

ENCODERS = {'timm': 'resnet10t', 'pretrainedmodels': 'se_resnext50_32x4d', 'torchvision callable': torchvision.models.resnet18,
            'from scratch': 'unet'}

for source, arch in ENCODERS.items():
    model = MoreDynamicUnet(arch, n_out=1, pretrained=False).eval()
    with torch.no_grad(): out = model(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 1, 64, 64), (source, out.shape)
    print(f'plain install: {source} encoder {getattr(arch, "__name__", arch)} builds a U-Net, output {tuple(out.shape)}')

fastunet = Path(sys.executable).parent / 'fastunet'
for command in ([], ['predict']):        # the usage, and a command's help (which imports the whole pipeline)
    subprocess.run([str(fastunet), *command, '--help'], check=True, capture_output=True, timeout=120)
print('plain install: fastunet --help and fastunet predict --help run')

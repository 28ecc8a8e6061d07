"""Make the tiny ResNet fixture under tests/fixtures/resnet/.

Builds a reduced-width wide-ResNet-style network from torchvision's own
ResNet/Bottleneck classes (stem 8 ch, base_width 128 so bottleneck inner
width = 2*planes, layers [2,2,1,1] with planes 8,16,32,32, fc 128->10),
seed 0, BatchNorm params/buffers randomised, eval mode. Writes
  tiny_resnet.pth              torch.save(state_dict) (zip format)
  tiny_resnet_missing_tensor.pth  the same without layer2.0.conv2.weight
  tiny_resnet_io.safetensors   f32: input [2,3,64,64], layer1..layer4 (NCHW),
                               pooled [2,128], logits [2,10]
  README.md

Run from the repository root:
    /root/venv/bin/python tools/make_resnet_fixture.py
"""
import os

import torch
import torch.nn as nn
from safetensors.numpy import save_file
from torchvision.models.resnet import Bottleneck, ResNet

OUT = os.path.join("tests", "fixtures", "resnet")


class TinyResNet(ResNet):
    def __init__(self):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = 8
        self.dilation = 1
        self.groups = 1
        self.base_width = 128
        self.conv1 = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(Bottleneck, 8, 2)
        self.layer2 = self._make_layer(Bottleneck, 16, 2, stride=2)
        self.layer3 = self._make_layer(Bottleneck, 32, 1, stride=2)
        self.layer4 = self._make_layer(Bottleneck, 32, 1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32 * Bottleneck.expansion, 10)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + torch.randn_like(m.weight) * 0.1)
                m.bias.copy_(torch.randn_like(m.bias) * 0.1)
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    model.eval()

    torch.save(model.state_dict(), os.path.join(OUT, "tiny_resnet.pth"))
    # The same checkpoint with one tensor left out, for the loader's "missing tensor" error.
    incomplete = {k: v for k, v in model.state_dict().items() if k != "layer2.0.conv2.weight"}
    torch.save(incomplete, os.path.join(OUT, "tiny_resnet_missing_tensor.pth"))

    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    feats = {}
    hooks = [getattr(model, n).register_forward_hook(
        lambda mod, inp, out, n=n: feats.__setitem__(n, out.detach().clone()))
        for n in ("layer1", "layer2", "layer3", "layer4", "avgpool")]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()

    out = {"input": x}
    for n in ("layer1", "layer2", "layer3", "layer4"):
        out[n] = feats[n]
    out["pooled"] = torch.flatten(feats["avgpool"], 1)
    out["logits"] = logits
    out = {k: v.contiguous().numpy().astype("float32") for k, v in out.items()}
    for k, v in out.items():
        print(k, list(v.shape))
    save_file(out, os.path.join(OUT, "tiny_resnet_io.safetensors"))

    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(
            "Made by `/root/venv/bin/python tools/make_resnet_fixture.py` (seed 0).\n\n"
            "`tiny_resnet.pth` is the state_dict of a reduced-width wide-ResNet "
            "built from torchvision's `ResNet`/`Bottleneck` classes and run with "
            "the inherited `forward`: stem conv1 7x7/2 pad 3 (3->8, no bias), bn1, "
            "ReLU, maxpool 3x3/2 pad 1; then Bottleneck stages with "
            "`base_width=128` (inner width = planes*2, output = planes*4): layer1 "
            "2 blocks planes 8 (inner 16, out 32, stride 1, block 0 has a 1x1 "
            "conv+BN downsample), layer2 2 blocks planes 16 (inner 32, out 64, "
            "stride 2 on the 3x3 conv2 of block 0), layer3 1 block planes 32 "
            "(inner 64, out 128, stride 2), layer4 1 block planes 32 (inner 64, "
            "out 128, stride 2); every first block has a downsample; "
            "AdaptiveAvgPool2d(1), fc Linear(128->10). All BatchNorms "
            "(eps 1e-5) have randomised weight (1+0.1N), bias (0.1N), "
            "running_mean (0.1N) and running_var (U[0.5,1.5]); eval mode.\n\n"
            "`tiny_resnet_io.safetensors` (f32): `input` [2,3,64,64] "
            "(torch.manual_seed(1); randn), stage outputs `layer1` [2,32,16,16], "
            "`layer2` [2,64,8,8], `layer3` [2,128,4,4], `layer4` [2,128,2,2], "
            "`pooled` [2,128], `logits` [2,10].\n")


if __name__ == "__main__":
    main()

"""List torchvision ResNet-50 / Wide-ResNet-50-2 state_dict keys and shapes.

Writes tests/fixtures/resnet/resnet50_state_dict.txt and
wide_resnet50_2_state_dict.txt: one line per state_dict entry, in
state_dict order, `key<TAB>d0,d1,...` (0-dim tensors: empty shape field).
No weights are downloaded (weights=None).

Run from the repository root:
    /root/venv/bin/python tools/list_resnet_keys.py
"""
import os

import torch
import torchvision

OUT = os.path.join("tests", "fixtures", "resnet")


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    for name in ("resnet50", "wide_resnet50_2"):
        model = getattr(torchvision.models, name)(weights=None)
        sd = model.state_dict()
        path = os.path.join(OUT, f"{name}_state_dict.txt")
        with open(path, "w") as f:
            for k, v in sd.items():
                f.write(f"{k}\t{','.join(str(d) for d in v.shape)}\n")
        print(path, len(sd), "entries")


if __name__ == "__main__":
    main()

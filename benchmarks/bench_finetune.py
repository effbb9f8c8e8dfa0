"""Fine-tuning strategies side by side: trainable parameters, peak training memory and time per epoch.

    python benchmarks/bench_finetune.py [--model vit_small_patch16_224] [--size 384] [--images 32] [--batch 8]
                                        [--epochs 2] [--strategies full lora fpt ...]

Every strategy fine-tunes the same timm ViT (random init: no downloads) as a 2-class patch classifier
on the same synthetic images at ``--size`` (high resolution), with Adam, through
``mil.finetune.loop.train_patches``. FPT wraps that ViT frozen and trains its side network at half
the resolution. Each strategy runs in its own process, so its peak RSS is its own. Columns:
trainable parameters and their % of the encoder (the ViT without its classifier); accounted peak
training memory (weights + gradients + Adam states + saved activations of one step, the same on
CPU and GPU); measured peak RSS growth of the process during training; seconds per epoch (mean
after the first epoch when there are several); last epoch's loss.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

STRATEGIES = ["full", "linear_probe", "lp_ft", "unfreeze_last_to_first", "unfreeze_first_to_last", "l2_sp",
              "discriminative", "auto_rgn", "lora", "fpt"]
LR = {"lora": 1e-3, "fpt": 1e-3, "linear_probe": 1e-3}


def _data(n: int, size: int):
    """Two classes that differ in colour balance and texture scale, the same for every strategy."""
    import torch

    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    x[:, 0] += (y.float() * 0.6 - 0.3)[:, None, None]
    return x, y


def child(args) -> None:
    """One strategy in a fresh process; prints a JSON line."""
    import psutil
    import timm
    import torch

    from mil.finetune import create_finetune
    from mil.finetune.base import count
    from mil.finetune.loop import train_patches

    torch.manual_seed(0)
    x, y = _data(args.images, args.size)
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, len(x), args.batch)]
    name = args.child
    if name == "fpt":
        model = timm.create_model(args.model, pretrained=False, img_size=args.size, num_classes=0)
        encoder = count(model.parameters())
        strategy = create_finetune("fpt", out_dim=2)
    else:
        model = timm.create_model(args.model, pretrained=False, img_size=args.size, num_classes=2)
        encoder = count(model.parameters()) - count(model.get_classifier().parameters())
        strategy = create_finetune(name)
    rss = psutil.Process().memory_info().rss
    _, history = train_patches(model, strategy, batches, epochs=args.epochs, lr=LR.get(name, 1e-4))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    timed = history[1:] or history
    print(json.dumps({"strategy": name, "trainable": history[-1]["trainable_params"], "encoder": encoder,
                      "peak_mb": history[-1]["peak_mb"], "rss_growth_mb": round(max(0, peak_rss - rss) / 2**20, 1),
                      "s_per_epoch": round(sum(h["seconds"] for h in timed) / len(timed), 2),
                      "loss": round(history[-1]["loss"], 4)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--size", type=int, default=384, help="input resolution (FPT's side network gets half)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for name in args.strategies:
        cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--size", str(args.size),
               "--images", str(args.images), "--batch", str(args.batch), "--epochs", str(args.epochs)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: done", file=sys.stderr)
    full = next((r for r in rows if r["strategy"] == "full"), None)
    print(f"{args.model}, {args.size}² input, {args.images} images, batch {args.batch}, {args.epochs} epochs, Adam, CPU\n")
    print("| strategy | trainable params | % of encoder | peak train MB (accounted) | vs full | peak RSS growth MB "
          "| s/epoch | last loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['peak_mb'] / full['peak_mb']:.0%}" if full else "n/a"
        print(f"| {r['strategy']} | {r['trainable']:,} | {100 * r['trainable'] / r['encoder']:.2f} % | {r['peak_mb']:,.0f} "
              f"| {ratio} | {r['rss_growth_mb']:,.0f} | {r['s_per_epoch']} | {r['loss']} |")


if __name__ == "__main__":
    main()

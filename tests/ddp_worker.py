"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU): plain PyTorch DDP over
MoreDynamicUnet with every decoder option. Each rank trains on its own generated batch; DDP must average the
gradients so both ranks hold the same ones, with `find_unused_parameters=False` (an unused parameter makes
DDP fail on the next step). Rank 0 writes one JSON line per option set to the file given as argument."""
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastunet.learner.head_losses import MultiHeadLoss
from fastunet.unet.model import MoreDynamicUnet

OPTION_SETS = {
    'default': {}, 'blog': dict(config='blog'), 'scse': dict(attention='scse'), 'self_attention': dict(attention='self'),
    'attention_gates': dict(attention_gates=True), 'hypercolumns': dict(hypercolumns=True),
    'middle_attention': dict(middle_scale=1, middle_attention=True), 'transposed': dict(upsample='transposed'),
    'pixel_shuffle_blur': dict(upsample='pixel_shuffle', blur=True), 'bilinear_no_light_stage': dict(upsample='bilinear', conv_before_upsample=False),
    'group_norm_gelu': dict(norm='group', act='gelu'), 'grad_checkpointing': {},
    'deep_supervision_classifier': dict(deep_supervision=True, classifier=True),   # a dict of outputs, every head used
}
LOSS = MultiHeadLoss(torch.nn.functional.cross_entropy)     # the plain loss for the other option sets


def flat_grads(model) -> torch.Tensor:
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    if missing: raise RuntimeError(f'parameters without a gradient: {missing[:5]}')
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main(out_path: str) -> None:
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = []
    for name, options in OPTION_SETS.items():
        torch.manual_seed(0)                          # the same initial weights on every rank
        model = MoreDynamicUnet('resnet10t', n_out=2, n_in=3, **options)
        if name == 'grad_checkpointing': model.set_grad_checkpointing()
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(100 + rank)   # each rank its own data
        for _ in range(2):                            # the second step fails if a parameter went unused
            x, y = torch.randn(2, 3, 64, 64, generator=generator), torch.randint(0, 2, (2, 64, 64), generator=generator)
            optimizer.zero_grad()
            LOSS(ddp(x), y).backward()
            grads = flat_grads(model)
            optimizer.step()
        with ddp.no_sync():                           # control: without DDP's averaging the ranks' gradients differ
            optimizer.zero_grad()
            LOSS(ddp(x), y).backward()
        local = flat_grads(model)
        gathered_local = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered_local, local)
        gathered = [torch.empty_like(grads) for _ in range(world)]
        dist.all_gather(gathered, grads)
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered_params = [torch.empty_like(params) for _ in range(world)]
        dist.all_gather(gathered_params, params)
        results.append(dict(option=name, grad_norm=grads.norm().item(),
                            max_grad_difference=max((g - gathered[0]).abs().max().item() for g in gathered),
                            max_local_grad_difference=max((g - gathered_local[0]).abs().max().item() for g in gathered_local),
                            max_param_difference=max((p - gathered_params[0]).abs().max().item() for p in gathered_params)))
    if rank == 0:
        with open(out_path, 'w') as f: f.write('\n'.join(json.dumps(r) for r in results) + '\n')
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])

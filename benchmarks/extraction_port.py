"""HF's PyTorch port of the bottom-up-attention detector, timed on the inputs
`benchmarks/extraction.py --port_inputs=DIR` wrote (the same weights, config and
images), on this CPU. Run in the port's own environment (torch, torchvision and
the port's files; not vlpjax's):

  <torch env>/bin/python benchmarks/extraction_port.py --port_dir=<lxmert folder> \
      --inputs=/tmp/extraction_inputs [--threads=N]

`--port_dir`: a copy of the `lxmert/` folder of
huggingface/transformers-research-projects (`modeling_frcnn.py`,
`processing_image.py`, `utils.py`), imported from there, never vendored.
It also compares its regions of the first image with vlpjax's. The port's
`norm_box` is replaced (see `main`): as published, its batched inference fails.
Batch 1 runs each image alone (its `Preprocess` pads nothing then); batch N
pads a batch to its largest image, as the port does. Each case after one
warm-up call. Adds its rows to benchmarks/results/extraction.json.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'extraction.json')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--port_dir', required=True)
  parser.add_argument('--inputs', required=True)
  parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  sys.path.insert(0, args.port_dir)
  import modeling_frcnn  # pylint: disable=import-outside-toplevel,import-error
  import processing_image  # pylint: disable=import-outside-toplevel,import-error
  import utils  # pylint: disable=import-outside-toplevel,import-error

  # The port's norm_box divides [B, N, 2] coordinates by [B] sizes, which fails
  # for batches of other than 2 images (and mixes images up at 2); the benchmark
  # replaces it with the per-image division it means.
  modeling_frcnn.norm_box = lambda boxes, raw_sizes: torch.cat(
      [boxes[:, :, 0::2] / raw_sizes[:, None, 1:2], boxes[:, :, 1::2] / raw_sizes[:, None, 0:1]],
      dim=-1)[:, :, [0, 2, 1, 3]]
  with open(os.path.join(args.inputs, 'hf_config.json'), encoding='utf-8') as f:
    settings = json.load(f)
  batch_size = settings.pop('batch_size')
  config = utils.Config(settings)
  model = modeling_frcnn.GeneralizedRCNN(config).eval()
  with np.load(os.path.join(args.inputs, 'weights.npz'), allow_pickle=False) as weights:
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(weights[k]) for k in weights.files}, strict=False)
  missing = [k for k in missing if not k.endswith('num_batches_tracked')]
  if missing or unexpected:
    raise ValueError(f'weights do not fit the port: missing {missing}, unexpected {unexpected}')
  with np.load(os.path.join(args.inputs, 'images.npz'), allow_pickle=False) as stored:
    images = [stored[k] for k in sorted(stored.files, key=lambda k: int(k.split('_')[1]))]
  preprocess = processing_image.Preprocess(config)

  def detect(batch):
    # The port takes HWC float tensors in the config's channel order (BGR).
    tensors = [torch.from_numpy(np.ascontiguousarray(image[..., ::-1])).float() for image in batch]
    with torch.no_grad():
      pixels, sizes, scales = preprocess(tensors)
      return model(pixels, sizes, scales_yx=scales, padding='max_detections',
                   max_detections=config.MAX_DETECTIONS, return_tensors='pt')

  def timed(run):
    began = time.perf_counter()
    run()
    return time.perf_counter() - began

  batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
  rows = []
  for case, groups in (('batch 1 (own size)', [[image] for image in images]),
                       (f'batch {batch_size} (padded to the largest)', batches)):
    first = timed(lambda: detect(groups[0]))
    seconds = timed(lambda: [detect(group) for group in groups])
    rows.append(dict(impl='hf port (torch)', case=case, first_call_seconds=first,
                     seconds=seconds, images=len(images),
                     images_per_second=len(images) / seconds))
    print(f"port {case:30s} {len(images) / seconds:.3f} images/s ({seconds:.1f} s for "
          f"{len(images)}; first call {first:.1f} s)", flush=True)
  with np.load(os.path.join(args.inputs, 'vlpjax_regions_0.npz'), allow_pickle=False) as ours:
    theirs = detect(images[:1])
    count = int(theirs['preds_per_image'][0])
    agreement = dict(
        regions=[count, len(ours['boxes'])],
        same_classes=bool(count == len(ours['classes']) and np.array_equal(
            theirs['obj_ids'][0, :count].numpy(), ours['classes'])))
    if agreement['same_classes']:
      agreement.update(
          boxes_max_abs_diff=float(np.abs(theirs['boxes'][0, :count].numpy() - ours['boxes']).max()),
          features_max_abs_diff=float(np.abs(theirs['roi_features'][0, :count].numpy()
                                             - ours['features']).max()),
          scores_max_abs_diff=float(np.abs(theirs['obj_probs'][0, :count].numpy()
                                           - ours['scores']).max()))
  print(f'first image, port vs vlpjax: {agreement}')
  with open(RESULTS, encoding='utf-8') as f:
    results = json.load(f)
  results['port_agreement_first_image'] = agreement
  results['results'] = [r for r in results['results'] if r['impl'] == 'vlpjax'] + rows
  results['port_machine'] = dict(platform=platform.platform(), torch=torch.__version__,
                                 threads=torch.get_num_threads())
  with open(RESULTS, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {RESULTS}')


if __name__ == '__main__':
  main()

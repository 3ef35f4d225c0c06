"""Serving: the exported ONNX graph (BGR images in [0, 1] in, L2-normalised features out), its int8 form, and an
exported file scored where the test expects a backbone."""
import collections
import logging
import os
import re
import shutil
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import datasets
import model
import resnet12
import swin_transformer
import utils

# Images calibration reads at most: enough for stable activation ranges, and each is held with all its activations;
# fewer than the least give ranges that real images overflow (one image: feature cosines to the float graph of 0.8)
CALIBRATION_IMAGES, LEAST_CALIBRATION_IMAGES = 256, 16


class ServingNetwork(nn.Module):
    """BGR images in [0, 1], (B, 3, S, S) float32 -> L2-normalised float32 features. The pixel normalisation is
    inside, so that serving code only decodes, resizes and divides by 255."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.register_buffer('pixel_mean', torch.tensor(datasets.PIXEL_MEAN_BGR).view(1, 3, 1, 1))
        self.register_buffer('pixel_std', torch.tensor(datasets.PIXEL_STD_BGR).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone((images - self.pixel_mean) / self.pixel_std).float(), dim=1)


def export(backbone: nn.Module, path: str, img_size: int, description: dict, calibration: list | None = None) -> dict:
    """Write `backbone` as an ONNX serving graph at `path`, int8 when `calibration` is given; returns its metadata.
    Everything is written in a private directory beside `path` and renamed over it once whole: a full disk, an
    error or Ctrl-C leaves the file that was there as it was, and no temporary file."""
    workspace = None
    try:
        workspace = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.', dir=os.path.dirname(os.path.abspath(path)))
        written = os.path.join(workspace, 'float32.onnx')
        contract = export_onnx(backbone, written, img_size, description)
        if calibration is not None:
            float_path, written = written, os.path.join(workspace, 'int8.onnx')
            contract = quantize_onnx(float_path, written, calibration, contract)
        os.replace(written, path)
        return contract
    except OSError as error:
        raise utils.RunError(f'could not write {path} ({error.strerror or error}); nothing was written and the file '
                             'that was there is as it was: free space or fix the storage, then rerun') from None
    finally:
        if workspace is not None:
            shutil.rmtree(workspace, ignore_errors=True)


def export_onnx(backbone: nn.Module, path: str, img_size: int, description: dict) -> dict:
    """Write ServingNetwork(backbone), any batch size, to `path`; returns its metadata (input contract, description)."""
    example = torch.rand(2, 3, img_size, img_size)
    batch = torch.export.Dim('batch', min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(ServingNetwork(backbone).eval(), (example,), dynamo=True, input_names=['images'],
                                    output_names=['features'], dynamic_shapes=({0: batch},), verbose=False)
    contract = {'input': f'images: float32 (batch, 3, {img_size}, {img_size}), BGR channel order, values in [0, 1] '
                         '(decoded pixels / 255, resized to the size)',
                'output': f'features: float32 (batch, {backbone.feature_dim}), L2-normalised',
                **{key: str(value) for key, value in description.items()}}
    program.model.metadata_props.update(contract)
    program.save(path, external_data=False)  # one self-contained file: the weights inline, no `.data` beside it
    return contract


def quantize_onnx(float_path: str, int8_path: str, calibration: list, metadata: dict) -> dict:
    """Write an int8 copy of a serving graph, static QDQ (int8 weights per channel, activation ranges calibrated on
    `calibration`'s (1, 3, S, S) arrays), with `metadata` and how it was quantized; returns that metadata. Static QDQ
    was the fastest int8 form for all three backbones on the CPU, mean feature cosine > 0.997 (bench/export.py)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Images(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{'images': image} for image in calibration])

        def get_next(self):
            return next(self.feeds, None)

    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # the quantizer's advice on pre-processing, once per weight
    try:
        quantize_static(float_path, int8_path, Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)
    metadata = dict(metadata, precision='int8', quantization='static')
    quantized = onnx.load(int8_path)
    onnx.helper.set_model_props(quantized, {key: str(value) for key, value in metadata.items()})
    onnx.save(quantized, int8_path)
    return metadata


def calibration_images(root: str, list_path: str, img_size: int) -> list:
    """Up to CALIBRATION_IMAGES images of a list as serving input (BGR in [0, 1], float32), each a batch of one:
    calibration holds every intermediate tensor of a batch at once."""
    samples = datasets.read_checked_list(root, list_path, '--calibration_root')[:CALIBRATION_IMAGES]
    if len(samples) < LEAST_CALIBRATION_IMAGES:
        raise utils.RunError(f'{list_path} holds {len(samples)} images: calibrating int8 activation ranges takes at '
                             f'least {LEAST_CALIBRATION_IMAGES} ({CALIBRATION_IMAGES} are read); give a longer '
                             '--calibration_list')
    dataset = datasets.ImageDataset(samples, img_size, train=False, augment=False)
    images = []
    for index in range(len(dataset)):
        item = dataset[index]
        if item['bad']:
            raise utils.RunError(item['bad'])
        images.append(item['image'].float().div(255).numpy()[None])
    return images


def read_architecture(path: str) -> dict | None:
    """What an export holds, read from its graph: the image size its input takes, the size of the features it gives
    and the backbone its layers are of (see graph_backbone); metadata that says otherwise stops in one line naming
    both. None for a file that is not ONNX (OnnxBackbone names the problem)."""
    import onnx
    try:
        exported = onnx.load(path, load_external_data=False)
    except Exception:  # not an ONNX file
        return None
    held = {name: value for name, value in graph_facts(exported.graph).items() if value is not None}
    claimed = metadata_claims({entry.key: entry.value for entry in exported.metadata_props})
    for name, value in claimed.items():
        if name in held and held[name] != value:
            raise model.WeightsFileError(
                f'{path}: its metadata says {name} {value}, its graph holds {name} {held[name]}: the metadata does '
                'not describe this graph; export the weights again with --export_onnx')
    return dict(claimed, **held)


def graph_facts(graph) -> dict:
    """{'img_size', 'feature_dim', 'backbone'} of a serving graph, each None where the graph does not show it."""
    images, features = shape_of(graph.input), shape_of(graph.output)  # (batch, 3, S, S) and (batch, d)
    return {'img_size': images[3] if len(images) == 4 else None,
            'feature_dim': features[1] if len(features) == 2 else None, 'backbone': graph_backbone(graph)}


def shape_of(values) -> list[int | None]:
    """The shape of the first of a graph's inputs or outputs, None for a dimension it leaves open (the batch)."""
    dimensions = values[0].type.tensor_type.shape.dim if len(values) else []
    return [dimension.dim_value or None for dimension in dimensions]


def graph_backbone(graph) -> str | None:
    """The backbone whose layers a graph holds: a Swin has one attention softmax per block (12 in Swin_tiny, 24 in
    Swin_base), ResNet12 none and a max-pool per stage; None for any other graph. Export and int8 quantization keep
    both counts."""
    operations = collections.Counter(node.op_type for node in graph.node)
    for name, config in swin_transformer.SWIN_CONFIGS.items():
        if operations['Softmax'] == sum(config['depths']):
            return name
    if operations['Softmax'] == 0 and operations['MaxPool'] == len(resnet12.WIDTHS):
        return 'Resnet12'
    return None


def metadata_claims(metadata: dict) -> dict:
    """What the metadata export() writes says of the graph: its backbone, image size and feature size (those given)."""
    claims = {}
    if metadata.get('backbone') in model.BACKBONE_NAMES:
        claims['backbone'] = metadata['backbone']
    if size := re.search(r'\(batch, 3, (\d+), \1\)', metadata.get('input', '')):
        claims['img_size'] = int(size.group(1))
    if width := re.search(r'\(batch, (\d+)\)', metadata.get('output', '')):
        claims['feature_dim'] = int(width.group(1))
    return claims


class OnnxBackbone(nn.Module):
    """An exported student run by ONNX Runtime as a test backbone; undoes the normalisation (the graph has its own)."""

    def __init__(self, path: str, img_size: int):
        super().__init__()
        import onnxruntime
        try:
            self.session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
        except Exception as error:  # not an ONNX file, or a damaged one
            raise model.WeightsFileError(f'{path}: not a readable ONNX model ({utils.first_line(error)})') from None
        graph_input = self.session.get_inputs()[0]
        if list(graph_input.shape[1:]) != [3, img_size, img_size]:
            raise model.WeightsFileError(f'{path} takes images of shape {graph_input.shape[1:]}, not (3, {img_size}, '
                                         f'{img_size}): run with --img_size {graph_input.shape[-1]}, or export again '
                                         f'at --img_size {img_size}')
        self.input_name = graph_input.name
        self.feature_dim = self.session.get_outputs()[0].shape[1]
        self.pixel_mean = torch.tensor(datasets.PIXEL_MEAN_BGR).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(datasets.PIXEL_STD_BGR).view(1, 3, 1, 1)

    def forward(self, normalised_images: torch.Tensor) -> torch.Tensor:
        images = normalised_images.float().cpu() * self.pixel_std + self.pixel_mean
        features = self.session.run(None, {self.input_name: images.numpy()})[0]
        return torch.from_numpy(features).to(normalised_images.device)

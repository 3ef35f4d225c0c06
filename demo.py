"""The CPU demo: a synthetic landmark data set in the real list format, and the demo's results table and figure.

    python demo.py data OUT_DIR [--num_train_landmarks 100 ...]   writes the data set (deterministic to the byte), or
                                                                  reuses the one there when whole
    python demo.py report RUNS_DIR OUT_DIR                        writes results.md and summary.png from the runs
"""
import argparse
import glob
import json
import multiprocessing
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import run_directory
import utils

# Synthetic landmarks
#
# Each landmark is a procedural building: one to four blocks side by side on a plinth, each block with
# its own body colour from the landmark's palette, a roof shape (flat, gable, dome, spire, battlements)
# and a facade pattern (stripes, checks, diagonals, dots, window grid). Identity is carried by global
# cues (palette, silhouette, pattern type) so that features learnt on some landmarks transfer to unseen
# ones. Every view warps the landmark with a random perspective (viewpoint), scale and offset (crop),
# over a fresh background (sky, horizon, ground, distant clutter), adds occluders in front and changes
# the lighting (gain, tint, gamma, shading gradient, noise).
#
# Labels. train.txt and val.txt hold the training landmarks (label = landmark, val = other views).
# test.txt holds unseen landmarks, 10 views each. Some test landmarks come in twin pairs: two landmarks
# of one site that share palette, plinth and layout and differ in one block's roof and facade pattern.
# Column 3 (coarse) is the site, so it merges each twin pair; column 4 (fine) is the landmark, so it
# tells the twins apart, so fine verification has near-identical negative pairs that coarse verification
# counts as positives. Training landmarks contain such twins too, each one its own class, so that a
# model can learn the fine differences.
#
# Every random draw comes from a generator seeded by (seed, split, landmark, view), so the same seed
# gives the same bytes whatever the sizes of the other splits.

ROOF_TYPES = ('flat', 'gable', 'dome', 'spire', 'battlements')
PATTERN_TYPES = ('horizontal_stripes', 'vertical_stripes', 'checks', 'diagonals', 'dots', 'windows')
TWIN_PAIR_EVERY = 5          # one twin pair per this many landmarks, so pairs hold 40% of them
CANVAS_SCALE = 2             # the landmark is drawn at this multiple of image_size, then warped down
JPEG_QUALITY = 90
SPLIT_CODES = {'train': 1, 'test': 2}
TWIN_STREAM = 1              # generator keys of a twin: (seed, split, site, TWIN_STREAM)
VIEW_STREAM = 1 << 20        # generator keys of a view: (seed, split, landmark, VIEW_STREAM, view)


def _generator(*keys):
    """A numpy generator determined by a tuple of non-negative integers."""
    return np.random.default_rng(np.random.SeedSequence([int(key) for key in keys]))


def _hsv_to_rgb(hue, saturation, value):
    """One colour from HSV in [0, 1] to an RGB tuple of ints."""
    rgb = Image.new('HSV', (1, 1), (int((hue % 1.0) * 255), int(saturation * 255), int(value * 255)))
    return rgb.convert('RGB').getpixel((0, 0))


def _random_palette(rng):
    """Four colours around two base hues: two body colours, a roof colour and a pattern colour."""
    base_hue = rng.uniform(0, 1)
    second_hue = base_hue + rng.choice([0.08, 0.33, 0.5, 0.67]) + rng.uniform(-0.04, 0.04)
    body = _hsv_to_rgb(base_hue, rng.uniform(0.35, 0.95), rng.uniform(0.55, 0.95))
    body_alternate = _hsv_to_rgb(base_hue + rng.uniform(-0.05, 0.05), rng.uniform(0.2, 0.8), rng.uniform(0.4, 0.9))
    roof = _hsv_to_rgb(second_hue, rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.9))
    pattern_value = rng.choice([rng.uniform(0.05, 0.3), rng.uniform(0.85, 1.0)])
    pattern = _hsv_to_rgb(second_hue + 0.5, rng.uniform(0.0, 0.9), pattern_value)
    return {'body': body, 'body_alternate': body_alternate, 'roof': roof, 'pattern': pattern}


def _random_block(rng):
    """Parameters of one block of a landmark: size, body colour choice, roof and facade pattern."""
    return {
        'width_weight': rng.uniform(0.5, 1.5),
        'height': rng.uniform(0.25, 0.7),
        'alternate_body': bool(rng.random() < 0.35),
        'roof': ROOF_TYPES[rng.integers(len(ROOF_TYPES))],
        'roof_height': rng.uniform(0.1, 0.35),
        'pattern': PATTERN_TYPES[rng.integers(len(PATTERN_TYPES))],
        'pattern_period': rng.uniform(0.05, 0.14),
    }


def random_landmark(rng):
    """Parameters of one landmark scene, drawn from rng."""
    block_count = int(rng.integers(1, 5))
    blocks = [_random_block(rng) for _ in range(block_count)]
    if block_count > 1 and rng.random() < 0.5:
        half = blocks[:(block_count + 1) // 2]
        blocks = half + [dict(block) for block in reversed(half[:block_count // 2])]
    return {
        'palette': _random_palette(rng),
        'blocks': blocks,
        'plinth_height': rng.uniform(0.02, 0.1),
        'plinth_colour': _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.3), rng.uniform(0.3, 0.8)),
        'width': rng.uniform(0.55, 0.95),
    }


def twin_landmark(landmark, rng):
    """A near-identical sibling: one block gets another roof and another facade pattern."""
    twin = dict(landmark, blocks=[dict(block) for block in landmark['blocks']])
    block = twin['blocks'][int(rng.integers(len(twin['blocks'])))]
    block['roof'] = rng.choice([roof for roof in ROOF_TYPES if roof != block['roof']])
    block['pattern'] = rng.choice([pattern for pattern in PATTERN_TYPES if pattern != block['pattern']])
    return twin


def _pattern_mask(pattern, width, height, period):
    """Boolean (height, width) facade pattern with the given period in pixels."""
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    if pattern == 'horizontal_stripes':
        return (rows / period) % 1.0 < 0.4
    if pattern == 'vertical_stripes':
        return (columns / period) % 1.0 < 0.4
    if pattern == 'checks':
        return ((rows // period) + (columns // period)) % 2 == 0
    if pattern == 'diagonals':
        return ((rows + columns) / (1.4 * period)) % 1.0 < 0.4
    if pattern == 'dots':
        offset_rows = (rows % period) - period / 2
        offset_columns = (columns % period) - period / 2
        return offset_rows ** 2 + offset_columns ** 2 < (0.3 * period) ** 2
    cell_rows = (rows - 0.3 * period) % (1.6 * period)
    cell_columns = (columns - 0.25 * period) % period
    inside = (cell_rows < period) & (cell_columns < 0.5 * period)
    return inside & (rows > 0.3 * period) & (rows < height - 0.3 * period)


def _draw_roof(draw, block, left, right, top, colour):
    """Draws the roof shape of a block whose body spans [left, right] from y=top downwards."""
    width = right - left
    height = block['roof_height'] * width * 1.5
    if block['roof'] == 'gable':
        draw.polygon([(left, top), (right, top), ((left + right) / 2, top - height)], fill=colour)
    elif block['roof'] == 'dome':
        draw.pieslice([left, top - height, right, top + height], 180, 360, fill=colour)
    elif block['roof'] == 'spire':
        middle = (left + right) / 2
        draw.polygon([(left + 0.2 * width, top), (right - 0.2 * width, top), (middle, top - 2.5 * height)],
                     fill=colour)
    elif block['roof'] == 'battlements':
        merlon_count = 5
        merlon_width = width / (2 * merlon_count - 1)
        for merlon in range(merlon_count):
            merlon_left = left + 2 * merlon * merlon_width
            draw.rectangle([merlon_left, top - 0.6 * height, merlon_left + merlon_width, top], fill=colour)


def render_landmark(landmark, canvas_size):
    """The landmark alone as an RGBA image (alpha 0 outside it), canvas_size pixels square."""
    canvas = Image.new('RGBA', (canvas_size, canvas_size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    palette = landmark['palette']
    total_width = landmark['width'] * canvas_size
    ground = canvas_size * 0.97
    plinth_top = ground - landmark['plinth_height'] * canvas_size
    left_edge = (canvas_size - total_width) / 2
    draw.rectangle([left_edge - 0.03 * canvas_size, plinth_top, left_edge + total_width + 0.03 * canvas_size, ground],
                   fill=landmark['plinth_colour'] + (255,))
    weights = np.array([block['width_weight'] for block in landmark['blocks']])
    edges = left_edge + np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum() * total_width
    facades = []
    for block, left, right in zip(landmark['blocks'], edges[:-1], edges[1:]):
        top = plinth_top - block['height'] * canvas_size
        body = palette['body_alternate'] if block['alternate_body'] else palette['body']
        draw.rectangle([left, top, right, plinth_top], fill=body + (255,))
        _draw_roof(draw, block, left, right, top=top, colour=palette['roof'] + (255,))
        facades.append((block, int(round(left)), int(round(right)), int(round(top)), int(round(plinth_top))))
    pixels = np.array(canvas)
    for block, left, right, top, bottom in facades:
        inset = max(1, (right - left) // 12)
        region = pixels[top + inset:bottom - inset, left + inset:right - inset]
        if region.shape[0] < 2 or region.shape[1] < 2:
            continue
        period = max(3.0, block['pattern_period'] * canvas_size)
        mask = _pattern_mask(block['pattern'], region.shape[1], region.shape[0], period)
        region[mask, :3] = palette['pattern']
    return Image.fromarray(pixels, 'RGBA')


def _perspective_coefficients(output_points, input_points):
    """PIL PERSPECTIVE data mapping output pixel coordinates to input coordinates (4 point pairs)."""
    system = []
    targets = []
    for (x, y), (u, v) in zip(output_points, input_points):
        system.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        system.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        targets.extend([u, v])
    return np.linalg.solve(np.array(system, dtype=np.float64), np.array(targets, dtype=np.float64))


def _background(rng, size):
    """A fresh outdoor background: sky gradient, horizon, ground, distant clutter."""
    # skies run from blue to overcast grey and grounds are earthy and unsaturated, as outdoors: the strong colours
    # of a view belong to the landmark
    sky_hue = rng.uniform(0.52, 0.65)
    sky_top = np.array(_hsv_to_rgb(sky_hue, rng.uniform(0.0, 0.6), rng.uniform(0.6, 1.0)), np.float32)
    sky_bottom = np.array(_hsv_to_rgb(sky_hue + rng.uniform(-0.03, 0.03), rng.uniform(0.0, 0.3),
                                      rng.uniform(0.7, 1.0)), np.float32)
    ground_colour = np.array(_hsv_to_rgb(rng.uniform(0.05, 0.35), rng.uniform(0.05, 0.35), rng.uniform(0.25, 0.6)),
                             np.float32)
    horizon = int(size * rng.uniform(0.55, 0.9))
    fraction = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    image = sky_top * (1 - fraction) + sky_bottom * fraction
    image[horizon:] = ground_colour
    pixels = np.repeat(image[:, None, :], size, axis=1).clip(0, 255).astype(np.uint8)
    background = Image.fromarray(pixels, 'RGB').convert('RGBA')
    draw = ImageDraw.Draw(background)
    for _ in range(int(rng.integers(0, 5))):
        colour = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.25), rng.uniform(0.3, 0.7)) + (255,)
        width = size * rng.uniform(0.05, 0.3)
        height = size * rng.uniform(0.05, 0.35)
        left = size * rng.uniform(-0.1, 1.0)
        if rng.random() < 0.5:
            draw.rectangle([left, horizon - height, left + width, horizon], fill=colour)
        else:
            draw.ellipse([left, horizon - height, left + width, horizon + 0.2 * height], fill=colour)
    return background


def _occlude(image, rng):
    """Draws up to two foreground occluders (people, cars, bushes) over half of the views."""
    size = image.size[0]
    draw = ImageDraw.Draw(image)
    occluder_count = int(rng.integers(1, 3)) if rng.random() < 0.5 else 0
    for _ in range(occluder_count):
        colour = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.9)) + (255,)
        width = size * rng.uniform(0.06, 0.25)
        height = size * rng.uniform(0.1, 0.35)
        left = size * rng.uniform(-0.1, 1.0)
        bottom = size * rng.uniform(0.8, 1.1)
        if rng.random() < 0.5:
            draw.rounded_rectangle([left, bottom - height, left + width, bottom], radius=width / 3, fill=colour)
        else:
            draw.ellipse([left, bottom - height, left + width, bottom], fill=colour)


def _relight(image, rng):
    """Global gain, colour tint, gamma, a linear shading gradient and sensor noise."""
    size = image.shape[0]
    gamma_table = (np.arange(256, dtype=np.float32) / 255.0) ** rng.uniform(0.8, 1.25)
    gain = rng.uniform(0.7, 1.2) * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    shading = 1.0 + rng.uniform(0, 0.4) * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    pixels = np.take(gamma_table, image) * (shading[:, :, None] * gain) * 255
    noise_amplitude = int(rng.integers(0, 8))
    # uniform integer noise: as good as Gaussian here and several times cheaper to draw
    pixels += rng.integers(-noise_amplitude, noise_amplitude + 1, size=pixels.shape, dtype=np.int16)
    return (pixels.clip(0, 255) + 0.5).astype(np.uint8)


def render_view(landmark_image, rng, image_size):
    """One photograph of a rendered landmark: viewpoint, scale, crop, background, occlusion, lighting."""
    # photographs of a landmark frame it: it fills most of the view
    side = image_size * rng.uniform(1.0, 1.45)
    centre_x = image_size * (0.5 + rng.uniform(-0.15, 0.15))
    centre_y = image_size * (0.5 + rng.uniform(-0.1, 0.15))
    rotation = np.deg2rad(rng.uniform(-8, 8))
    yaw = rng.uniform(-0.3, 0.3)
    pitch = rng.uniform(-0.15, 0.15)
    unit_corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    # yaw shortens one vertical edge and pitch one horizontal edge, as seen from off-axis
    unit_corners[:, 1] *= 1 + yaw * np.sign(unit_corners[:, 0])
    unit_corners[:, 0] *= 1 + pitch * np.sign(unit_corners[:, 1])
    unit_corners[:, 0] *= rng.uniform(0.85, 1.15)
    unit_corners += rng.uniform(-0.05, 0.05, size=unit_corners.shape)
    rotation_matrix = np.array([[np.cos(rotation), -np.sin(rotation)], [np.sin(rotation), np.cos(rotation)]])
    output_corners = unit_corners @ rotation_matrix.T * side + [centre_x, centre_y]
    canvas_size = landmark_image.size[0]
    input_corners = [(0, 0), (canvas_size, 0), (canvas_size, canvas_size), (0, canvas_size)]
    coefficients = _perspective_coefficients(output_corners, input_corners)
    warped = landmark_image.transform((image_size, image_size), Image.Transform.PERSPECTIVE, tuple(coefficients),
                                      Image.Resampling.BILINEAR)
    view = Image.alpha_composite(_background(rng, image_size), warped)
    _occlude(view, rng)
    view = view.convert('RGB')
    if rng.random() < 0.3:
        view = view.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return Image.fromarray(_relight(np.asarray(view), rng), 'RGB')


def _write_views(out_dir, relative_dir, landmark_image, rng_keys, view_indices, image_size):
    """Renders and saves the given views of one landmark; returns their relative paths."""
    os.makedirs(os.path.join(out_dir, relative_dir), exist_ok=True)
    relative_paths = []
    for view_index in view_indices:
        view = render_view(landmark_image, _generator(*rng_keys, view_index), image_size)
        relative_path = f'{relative_dir}/{view_index:02d}.jpg'
        view.save(os.path.join(out_dir, relative_path), format='JPEG', quality=JPEG_QUALITY)
        relative_paths.append(relative_path)
    return relative_paths


def _landmarks_with_twins(seed, split_code, count):
    """count landmarks of one split and the site of each: the first count // TWIN_PAIR_EVERY sites are twins."""
    twin_pair_count = count // TWIN_PAIR_EVERY
    landmarks = []
    sites = []
    site = 0
    while len(landmarks) < count:
        landmark = random_landmark(_generator(seed, split_code, site))
        landmarks.append(landmark)
        sites.append(site)
        if site < twin_pair_count and len(landmarks) < count:
            landmarks.append(twin_landmark(landmark, _generator(seed, split_code, site, TWIN_STREAM)))
            sites.append(site)
        site += 1
    return landmarks, sites


def _write_list(path, rows):
    """A UTF-8 tab-separated list, one row a line."""
    with open(path, 'w', encoding='utf-8', newline='\n') as list_file:
        for row in rows:
            list_file.write('\t'.join(str(field) for field in row) + '\n')


def _render_landmark_views(task) -> list[list[str]]:
    """Renders one landmark and writes its views to each (relative directory, view indices) of the task; returns
    the relative paths written, per destination."""
    out_dir, landmark, canvas_size, rng_keys, image_size, destinations = task
    landmark_image = render_landmark(landmark, canvas_size)
    return [_write_views(out_dir, relative_dir, landmark_image, rng_keys, view_indices, image_size=image_size)
            for relative_dir, view_indices in destinations]


def _render_all(tasks, processes: int) -> list:
    """_render_landmark_views over the tasks, in order, in `processes` processes (every view has its own generator,
    so the bytes do not depend on how many)."""
    if processes <= 1:
        return [_render_landmark_views(task) for task in tasks]
    with multiprocessing.get_context('fork').Pool(processes) as pool:
        return pool.map(_render_landmark_views, tasks, chunksize=4)


def make_synthetic_landmarks(out_dir, seed=0, num_train_landmarks=150, train_views=10, num_test_landmarks=50,
                             test_views=10, image_size=96, val_views=2, processes=1):
    """Writes a synthetic landmark data set under out_dir and returns its lists.

    train.txt: `path<TAB>name<TAB>label`, num_train_landmarks landmarks x train_views views.
    val.txt: the same landmarks, val_views other views each, labels in the training label space.
    test.txt: `path<TAB>name<TAB>coarse<TAB>fine`, num_test_landmarks unseen landmarks x test_views views;
    coarse labels merge twin landmark pairs (sites), fine labels separate them.
    Returns {'root', 'train_list', 'val_list', 'test_list', 'num_classes'} (paths absolute).
    The same arguments always give byte-identical files, whatever the number of `processes` rendering them.
    """
    if min(num_train_landmarks, train_views, num_test_landmarks, test_views) < 1 or val_views < 0:
        raise ValueError('make_synthetic_landmarks: landmark and view counts must be positive '
                         f'(got train {num_train_landmarks}x{train_views}, val views {val_views}, '
                         f'test {num_test_landmarks}x{test_views})')
    if seed < 0:
        raise ValueError(f'make_synthetic_landmarks: seed {seed} is negative; use a seed >= 0')
    if image_size < 16:
        raise ValueError(f'make_synthetic_landmarks: image_size {image_size} is too small; use 16 or more')
    out_dir = os.path.abspath(out_dir)
    canvas_size = CANVAS_SCALE * image_size
    train_landmarks, _ = _landmarks_with_twins(seed, SPLIT_CODES['train'], num_train_landmarks)
    test_landmarks, sites = _landmarks_with_twins(seed, SPLIT_CODES['test'], num_test_landmarks)
    train_tasks = [(out_dir, landmark, canvas_size, (seed, SPLIT_CODES['train'], label, VIEW_STREAM), image_size,
                    [(f'train/{label:04d}', range(train_views)),
                     (f'val/{label:04d}', range(train_views, train_views + val_views))])
                   for label, landmark in enumerate(train_landmarks)]
    test_tasks = [(out_dir, landmark, canvas_size, (seed, SPLIT_CODES['test'], fine_label, VIEW_STREAM), image_size,
                   [(f'test/{fine_label:04d}', range(test_views))])
                  for fine_label, landmark in enumerate(test_landmarks)]
    rendered = _render_all(train_tasks + test_tasks, processes)
    train_rows, val_rows, test_rows = [], [], []
    for label, (train_paths, val_paths) in enumerate(rendered[:len(train_tasks)]):
        name = f'train_landmark_{label:04d}'
        train_rows += [(path, name, label) for path in train_paths]
        val_rows += [(path, name, label) for path in val_paths]
    for fine_label, ((test_paths,), site) in enumerate(zip(rendered[len(train_tasks):], sites)):
        name = f'test_site_{site:04d}_landmark_{fine_label:04d}'
        test_rows += [(path, name, site, fine_label) for path in test_paths]
    lists = {'train_list': os.path.join(out_dir, 'train.txt'), 'val_list': os.path.join(out_dir, 'val.txt'),
             'test_list': os.path.join(out_dir, 'test.txt')}
    _write_list(lists['train_list'], train_rows)
    _write_list(lists['val_list'], val_rows)
    _write_list(lists['test_list'], test_rows)
    return dict(lists, root=out_dir, num_classes=len(train_landmarks))


DATA_MANIFEST = 'manifest.json'


def data_digest(out_dir: str) -> str:
    """sha256 over the lists and the bytes of every image they name, in list order."""
    lists = [os.path.join(out_dir, name) for name in ('train.txt', 'val.txt', 'test.txt')]
    images = []
    for list_path in lists:
        with open(list_path, encoding='utf-8') as handle:
            images += [os.path.join(out_dir, line.split('\t')[0]) for line in handle if line.strip()]
    return utils.file_digest(lists + images)


def reusable_data(out_dir: str, options: dict) -> dict | None:
    """The lists of a data set made before in out_dir with these options, if its manifest says so and every file
    still has the bytes it was written with; else None (missing, partial, damaged or made with other options)."""
    try:
        with open(os.path.join(out_dir, DATA_MANIFEST), encoding='utf-8') as handle:
            manifest = json.load(handle)
        if manifest.get('options') != options or manifest.get('digest') != data_digest(out_dir):
            return None
    except (OSError, ValueError):
        return None
    return manifest['lists']


def synthetic_landmarks_once(out_dir, **options) -> tuple[dict, bool]:
    """make_synthetic_landmarks(out_dir, **options) unless out_dir holds that very data set, whole (checked by its
    digest, not trusted); (its lists, whether it was reused). The manifest is written last: a set cut short by a
    kill has none and is made again."""
    out_dir = os.path.abspath(out_dir)
    recorded = {key: value for key, value in options.items() if key != 'processes'}
    lists = reusable_data(out_dir, recorded)
    if lists is not None:
        return lists, True
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, DATA_MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    lists = make_synthetic_landmarks(out_dir, **options)
    utils.write_json({'options': recorded, 'digest': data_digest(out_dir), 'lists': lists}, manifest_path)
    return lists, False


# The demo's report

# (row title, run key, test figures): a run key is the backbone, or 'Swin_tiny-untrained' for the floor
TABLE_ROWS = (('Swin-base teacher', 'Swin_base', 'student'),
              ('Swin-tiny student', 'Swin_tiny', 'student'),
              ('Swin-tiny query vs teacher gallery (cross)', 'Swin_tiny', 'cross'),
              ('Resnet12 student', 'Resnet12', 'student'),
              ('Resnet12 query vs teacher gallery (cross)', 'Resnet12', 'cross'),
              ('untrained Swin-tiny (floor)', 'Swin_tiny-untrained', 'student'),
              ('untrained Swin-tiny query vs teacher gallery (cross floor)', 'Swin_tiny-untrained', 'cross'))
FAR_COLUMNS = (1, 0)  # TAR at FAR 1e-2, then 1e-1


def read_runs(runs_dir: str) -> dict:
    """results.json of each demo run, keyed by backbone ('Swin_tiny-untrained' for the untrained floor)."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, '*', '*', run_directory.RESULTS_NAME))):
        run_dir = os.path.dirname(path)
        backbone = os.path.basename(os.path.dirname(run_dir)).split('-')[1]
        runs[backbone + ('-untrained' if run_dir.endswith('-untrained') else '')] = run_directory.read_results(run_dir)
    return runs


def _figure(value) -> str:
    return 'nan' if value is None else f'{value:.5f}'


def results_table(runs: dict) -> str:
    """results.md: the demo's runs in the shape of the published table, at FAR 1e-2 and 1e-1, with the checks of
    the method: students against the teacher, and the student queries against the teacher's gallery."""
    lines = ['| model | params (no head) | epochs | coarse TAR@1e-2 | fine TAR@1e-2 | coarse TAR@1e-1 '
             '| NN top-1 coarse | NN top-1 fine | GAP coarse | GAP fine |', '|---|---|---|---|---|---|---|---|---|---|']
    for title, key, figures in TABLE_ROWS:
        run = runs.get(key, {})
        test = run.get('test', {}).get(figures)
        if test is None:
            continue
        lines.append(f'| {title} | {run["parameters"]["student_backbone"]:.2e} | {len(run.get("epochs", []))} '
                     f'| {_figure(test["coarse"][1])} | {_figure(test["fine"][1])} | {_figure(test["coarse"][0])} '
                     f'| {_figure(test["coarse_nn_accuracy"])} | {_figure(test["fine_nn_accuracy"])} '
                     f'| {_figure(test.get("coarse_gap"))} | {_figure(test.get("fine_gap"))} |')
    teacher = runs.get('Swin_base', {}).get('test', {}).get('student')
    if teacher and teacher['coarse'][1]:
        lines.append('')
        for key, title in (('Swin_tiny', 'Swin-tiny'), ('Resnet12', 'ResNet12')):
            test = runs.get(key, {}).get('test', {})
            if 'student' in test and 'cross' in test:
                lines.append(f'- {title} student / teacher, coarse TAR at FAR 1e-2: '
                             f'{test["student"]["coarse"][1] / teacher["coarse"][1]:.3f}; its queries against the '
                             f'teacher\'s gallery / teacher: {test["cross"]["coarse"][1] / teacher["coarse"][1]:.3f}')
    return '\n'.join(lines) + '\n'


def summary_figure(runs: dict, path: str):
    """summary.png: TAR against FAR (log scale) for the teacher, both students, their cross curves and the floor;
    training loss and validation accuracy per epoch for each run."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, (curves, losses, accuracies) = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = {'Swin_base': ('teacher (Swin-base)', 'black'), 'Swin_tiny': ('Swin-tiny student', 'tab:blue'),
              'Resnet12': ('ResNet12 student', 'tab:orange'), 'Swin_tiny-untrained': ('untrained floor', 'grey')}
    for key, (name, colour) in styles.items():
        test = runs.get(key, {}).get('test', {})
        for figures, line, label in (('student', '-', name), ('cross', '--', f'{name} vs teacher gallery')):
            if figures in test and not (key == 'Swin_base' and figures == 'cross'):
                far = np.asarray(test[figures]['coarse_curve']['far'], dtype=float)
                tar = np.asarray(test[figures]['coarse_curve']['tar'], dtype=float)
                shown = far > 0
                curves.plot(far[shown], tar[shown], line, color=colour, label=label)
        epochs = runs.get(key, {}).get('epochs', [])
        if epochs:
            numbers = [entry['epoch'] for entry in epochs]
            losses.plot(numbers, [entry['loss'] for entry in epochs], color=colour, label=name)
            validated = [(entry['epoch'], entry['val_accuracy']) for entry in epochs
                         if entry['val_accuracy'] is not None]
            if validated:
                accuracies.plot(*zip(*validated), 'o-', color=colour, label=name)
    curves.set(xscale='log', xlabel='FAR (false accept rate)', ylabel='TAR', ylim=(0, 1.01),
               title='unseen landmarks, coarse labels')
    losses.set(xlabel='epoch', ylabel='training loss (CE + KD)', yscale='log', title='training loss')
    accuracies.set(xlabel='epoch', ylabel='top-1 accuracy', ylim=(0, 1.01), title='validation (seen landmarks)')
    for axes in (curves, losses, accuracies):
        axes.grid(True, which='both', alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    data = commands.add_parser('data', help='write the synthetic landmark data set')
    data.add_argument('out_dir')
    data.add_argument('--seed', type=int, default=0)
    data.add_argument('--num_train_landmarks', type=int, default=150)
    data.add_argument('--train_views', type=int, default=10)
    data.add_argument('--val_views', type=int, default=2)
    data.add_argument('--num_test_landmarks', type=int, default=50)
    data.add_argument('--test_views', type=int, default=10)
    data.add_argument('--image_size', type=int, default=96)
    data.add_argument('--processes', type=int, default=min(4, os.cpu_count() or 1),
                      help='rendering processes (the bytes are the same for any number)')
    report = commands.add_parser('report', help='write results.md and summary.png from the demo runs')
    report.add_argument('runs_dir')
    report.add_argument('out_dir')
    arguments = parser.parse_args(argv)
    if arguments.command == 'data':
        options = vars(arguments)
        del options['command']
        out_dir = options.pop('out_dir')
        result, reused = synthetic_landmarks_once(out_dir, **options)
        print(f'demo: the data set in {out_dir} ' + ('was made before with these settings and is whole: reused'
                                                   if reused else 'made'), file=sys.stderr)
        print('\n'.join(f'{key}: {value}' for key, value in result.items()))
        return
    runs = read_runs(arguments.runs_dir)
    table = results_table(runs)
    summary_figure(runs, os.path.join(arguments.out_dir, 'summary.png'))
    with open(os.path.join(arguments.out_dir, 'results.md'), 'w', encoding='utf-8') as handle:
        handle.write(table + '\n![TAR against FAR, training loss and validation accuracy](summary.png)\n')
    print(table, end='')


if __name__ == '__main__':
    main()

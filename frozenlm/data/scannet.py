"""ScanNet as ScanRefer / VoteNet detect objects in it (the detector of SQA3D's ScanQA baseline): the 18 classes,
their NYU40 ids, the mean box size of each class, and the detection targets built from a scene's boxes and
per-point instance labels (``box_targets``, ``vote_targets``), with the reference's augmentation of boxes.

Facts from SilongYong/SQA3D (``assets/data/scannet/model_util_scannet.py``, its ``meta_data/`` and
``ScanQA/lib/sepdataset.py``, themselves from ScanRefer and VoteNet); the code is this project's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# ScannetDatasetConfig.type2class: the 18 detection classes, in class order (the last gathers every other
# object class).
CLASS_NAMES = (
    "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter", "desk",
    "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub", "others",
)  # fmt: skip
NUM_CLASS = len(CLASS_NAMES)
NUM_SIZE_CLUSTER = NUM_CLASS  # one size cluster per class (the size class is the semantic class)
NUM_HEADING_BIN = 1  # ScanNet's boxes are axis-aligned: heading class and residual are always 0

# The NYU40 ids of objects (all but wall 1, floor 2 and ceiling 22): points of these instances vote, boxes of
# these classes are kept (batch_load_scannet_data.py's OBJ_CLASS_IDS, ScannetDatasetConfig.nyu40ids).
NYU40_IDS = np.array([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28,
                      29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40])  # fmt: skip

# NYU40 id -> class: an id whose NYU40 class name (column `nyu40class` of ScanNet's
# scannetv2-labels.combined.tsv) is one of CLASS_NAMES maps to it, every other id of NYU40_IDS to "others",
# as ScannetDatasetConfig._get_nyu40id2class builds it from that file. Named ids: 3 cabinet, 4 bed, 5 chair,
# 6 sofa, 7 table, 8 door, 9 window, 10 bookshelf, 11 picture, 12 counter, 14 desk, 16 curtain,
# 24 refrigerator, 28 shower curtain, 33 toilet, 34 sink, 36 bathtub.
_NAMED_IDS = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36)
NYU40ID_TO_CLASS: dict[int, int] = {
    int(nyu40): (_NAMED_IDS.index(nyu40) if nyu40 in _NAMED_IDS else NUM_CLASS - 1) for nyu40 in NYU40_IDS
}

# The mean box size (l, w, h along x, y, z, metres) of each class, in class order: the values of
# SilongYong/SQA3D assets/data/scannet/meta_data/scannet_reference_means.npz (`arr_0`, float64; ScanRefer's
# file, which ScannetDatasetConfig.mean_size_arr loads), written out here in full.
MEAN_SIZE = np.array([
    [0.7750491029714929, 0.9489772784305719, 0.9654205889420883],
    [1.8690326739217817, 1.8321471223511647, 1.1922299150646347],
    [0.6121477783923587, 0.6192873075057846, 0.7048084833710475],
    [1.4411389838393118, 1.6045203579823017, 0.8365229505964112],
    [1.0478072557954565, 1.2016418836390361, 0.6345700676484581],
    [0.5610123179013166, 0.6084721692226233, 1.7195040055943263],
    [1.0789489470730143, 0.8203399609681988, 1.1692119917347412],
    [0.8417109198057999, 1.3504794475570598, 1.689892503247653],
    [0.2305173710207977, 0.4764049876932717, 0.5656925618884787],
    [1.4548489887322953, 1.9711989456815506, 0.28643280467880305],
    [1.0785803060791836, 1.5370511310202535, 0.8650190604735265],
    [1.4311964378217468, 0.7692311116413818, 1.6498267253793382],
    [0.6296919388045009, 0.7087128690976665, 1.314335867333314],
    [0.4392503422374527, 0.41569593879911637, 1.7000274790657892],
    [0.5850446242623347, 0.5787843832293073, 0.7202961145680844],
    [0.5115869258698381, 0.5096067340403306, 0.3128736034402105],
    [1.1732075942887201, 1.0598714035004377, 0.5181252788752317],
    [0.43294385021345605, 0.5193350711870748, 0.4843745602902239],
], dtype=np.float64)  # fmt: skip

MAX_NUM_OBJ = 128  # boxes per scene in the targets (more are cut, fewer padded)
MAX_NUM_POINT = 50000  # points kept per prepared scene (batch_load_scannet_data.py)
MEAN_COLOR_RGB = np.array([109.8, 97.2, 83.8])  # subtracted from 0-255 colours, then / 256


def rotx(angle: float) -> np.ndarray:
    """The rotation by ``angle`` (radians) about x, right-handed."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def roty(angle: float) -> np.ndarray:
    """The rotation by ``angle`` about y, right-handed."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rotz(angle: float) -> np.ndarray:
    """The rotation by ``angle`` about z, right-handed."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


ROTATIONS = {"x": rotx, "y": roty, "z": rotz}


def rotate_boxes(boxes: np.ndarray, rotation: np.ndarray, axis: str) -> np.ndarray:
    """Axis-aligned boxes ``[K, 6]`` (centre, size) after the points are rotated by ``rotation`` about ``axis``,
    as the reference's ``rotate_aligned_boxes_along_axis``: centres rotate; the two sizes across ``axis``,
    ``(d1, d2)`` (y, z for x; x, z for y; x, y for z), become the extent of the rectangle +-d1/2, +-d2/2 laid
    in the x-y plane and rotated, ``(|R00| d1 + |R01| d2, |R10| d1 + |R11| d2)``. For z that is the rotated
    box's extent; for x and y (where the rectangle lies in the wrong plane) it scales one size by |cos|,
    at most 0.4 % at the augmentation's 5 degrees: kept, since the reference trained so."""
    rotation = np.asarray(rotation, dtype=np.float64)
    centres = boxes[:, 0:3] @ rotation.T
    across = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    sizes = boxes[:, 3:6].copy()
    d1, d2 = boxes[:, 3 + across[0]], boxes[:, 3 + across[1]]
    sizes[:, across[0]] = abs(rotation[0, 0]) * d1 + abs(rotation[0, 1]) * d2
    sizes[:, across[1]] = abs(rotation[1, 0]) * d1 + abs(rotation[1, 1]) * d2
    return np.concatenate([centres, sizes], axis=1)


def padded_boxes(instance_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A scene's boxes (``_aligned_bbox.npy`` rows: centre, size, NYU40 id, object id) as the targets hold
    them before augmentation: ``(boxes [MAX_NUM_OBJ, 6], box_label_mask [MAX_NUM_OBJ], count)``, the first
    ``count`` rows the scene's first boxes, the others zeros (which the augmentation moves like the rest, as
    the reference's)."""
    count = min(len(instance_boxes), MAX_NUM_OBJ)
    boxes = np.zeros((MAX_NUM_OBJ, 6))
    boxes[:count] = instance_boxes[:count, 0:6]
    mask = np.zeros(MAX_NUM_OBJ)
    mask[:count] = 1
    return boxes, mask, count


def semantic_classes(nyu40_ids: np.ndarray) -> np.ndarray:
    """The class index (0..17) of each NYU40 id of ``NYU40_IDS``; ``KeyError`` for any other id."""
    return np.array([NYU40ID_TO_CLASS[int(i)] for i in nyu40_ids], dtype=np.int64)


def box_targets(boxes: np.ndarray, instance_boxes: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """The box targets of VoteNet's losses from the (augmented) ``boxes [MAX_NUM_OBJ, 6]`` of
    :func:`padded_boxes` and the scene's ``instance_boxes`` (their NYU40 ids): ``center_label [128, 3]``,
    ``heading_class_label``/``heading_residual_label`` (zeros: one heading bin, axis-aligned boxes),
    ``size_class_label`` (= the semantic class) and ``size_residual_label [128, 3]`` (size minus the
    class's :data:`MEAN_SIZE`), ``sem_cls_label``; rows past ``count`` are 0."""
    classes = np.zeros(MAX_NUM_OBJ, dtype=np.int64)
    classes[:count] = semantic_classes(instance_boxes[:count, -2])
    residuals = np.zeros((MAX_NUM_OBJ, 3))
    residuals[:count] = boxes[:count, 3:6] - MEAN_SIZE[classes[:count]]
    return {
        "center_label": boxes[:, 0:3].astype(np.float32),
        "heading_class_label": np.zeros(MAX_NUM_OBJ, dtype=np.int64),
        "heading_residual_label": np.zeros(MAX_NUM_OBJ, dtype=np.float32),
        "size_class_label": classes.copy(),
        "size_residual_label": residuals.astype(np.float32),
        "sem_cls_label": classes,
    }


def vote_targets(xyz: np.ndarray, instance_labels: np.ndarray, semantic_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VoteNet's vote targets from the (sampled, augmented) points ``xyz [N, 3]``: each point of an instance
    whose NYU40 id (of its first point) is an object id votes for the centre of the instance's points'
    extent, ``(min + max) / 2``: ``vote_label [N, 9]`` (the offset centre - point, three times) and
    ``vote_label_mask [N]`` (1 for voting points). Label 0 (unannotated) has NYU40 id 0 and never votes."""
    votes = np.zeros((len(xyz), 3))
    mask = np.zeros(len(xyz), dtype=np.int64)
    if len(xyz):
        order = np.argsort(instance_labels, kind="stable")
        labels, starts = np.unique(instance_labels[order], return_index=True)
        first = semantic_labels[order[starts]]  # the semantic label of each instance's first point
        lows = np.minimum.reduceat(xyz[order], starts, axis=0)
        highs = np.maximum.reduceat(xyz[order], starts, axis=0)
        voting = np.isin(first, NYU40_IDS)
        instance = np.searchsorted(labels, instance_labels)
        centres = 0.5 * (lows + highs)
        chosen = voting[instance]
        votes[chosen] = centres[instance[chosen]] - xyz[chosen]
        mask[chosen] = 1
    return np.tile(votes, (1, 3)).astype(np.float32), mask


# -- converting a raw ScanNet scan (frozenlm prepare sqa3d) --------------------------------------------------
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2", "ushort": "u2",
    "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4",
    "double": "f8", "float64": "f8",
}  # fmt: skip


class SceneError(ValueError):
    """A raw ScanNet scan that cannot be converted; the message says which file and why (prepare names and
    counts the scene and goes on with the others)."""


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A binary PLY mesh (ScanNet's ``_vh_clean_2.ply``): ``(vertices, faces)``, the vertices as a structured
    array of the header's properties (``x, y, z, red, green, blue, alpha``) and the triangles ``[F, 3]``
    int64. Raises :class:`SceneError` for an ASCII or truncated file, or faces that are not triangles."""
    path = Path(path)
    with open(path, "rb") as file:
        data = file.read()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply") or end < 0:
        raise SceneError(f"{path} is not a PLY file (no 'ply' ... 'end_header' header)")
    header = data[:end].decode("ascii", errors="replace").splitlines()
    body = end + len("end_header\n")
    order, elements = None, []  # (name, count, [(property, dtype)] or ('list', count dtype, item dtype))
    for line in header[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            order = {"binary_little_endian": "<", "binary_big_endian": ">"}.get(words[1])
            if order is None:
                raise SceneError(f"{path} is {words[1]} PLY; only binary PLY (as ScanNet ships it) is read")
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                elements[-1][2].append(("list", _PLY_TYPES[words[2]], _PLY_TYPES[words[3]]))
            else:
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
    if order is None:
        raise SceneError(f"{path} has no 'format' line in its header")
    vertices, faces, offset = None, None, body
    for name, count, properties in elements:
        if any(p[0] == "list" for p in properties):
            if len(properties) != 1 or name != "face":
                raise SceneError(f"{path}: element {name!r} with list properties other than one face list")
            _, count_type, item_type = properties[0]
            row = np.dtype([("n", order + count_type), ("v", order + item_type, (3,))])
            if offset + count * row.itemsize > len(data):
                raise SceneError(f"{path} is truncated (its faces end past the file)")
            table = np.frombuffer(data, dtype=row, count=count, offset=offset)
            if count and (table["n"] != 3).any():
                raise SceneError(f"{path}: faces that are not triangles (ScanNet's meshes are triangles)")
            faces, offset = table["v"].astype(np.int64), offset + count * row.itemsize
        else:
            row = np.dtype([(p, order + t) for p, t in properties])
            if offset + count * row.itemsize > len(data):
                raise SceneError(f"{path} is truncated (its {name} element ends past the file)")
            table = np.frombuffer(data, dtype=row, count=count, offset=offset)
            if name == "vertex":
                vertices = table
            offset += count * row.itemsize
    if vertices is None or any(key not in vertices.dtype.names for key in ("x", "y", "z", "red", "green", "blue")):
        raise SceneError(f"{path} has no vertex element with x, y, z, red, green, blue")
    if faces is None:
        faces = np.zeros((0, 3), np.int64)
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise SceneError(f"{path}: face indices outside its {len(vertices)} vertices")
    return vertices, faces


def vertex_normals(xyz: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Per-vertex normals as ScanRefer's ``compute_normal``: unit face normals (cross product, divided by
    length + 1e-8) added to the vertices of each corner column with numpy's buffered fancy-index add (so a
    vertex gets, per corner column, the normal of the last face having it there), then normalised again."""
    normals = np.zeros(xyz.shape, dtype=xyz.dtype)
    if len(faces) == 0:
        return normals
    corners = xyz[faces]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    face_normals /= (np.linalg.norm(face_normals, axis=1, keepdims=True) + 1e-8).astype(xyz.dtype)
    for column in range(3):
        normals[faces[:, column]] += face_normals  # buffered: the last face per vertex wins, as the reference
    normals /= (np.linalg.norm(normals, axis=1, keepdims=True) + 1e-8).astype(xyz.dtype)
    return normals


def read_axis_alignment(path: str | Path) -> np.ndarray | None:
    """The 4x4 ``axisAlignment`` of a scan's ``<scene>.txt`` (row-major), None when the file has none."""
    for line in Path(path).read_text().splitlines():
        if line.strip().startswith("axisAlignment"):
            values = line.split("=", 1)[1].split()
            if len(values) != 16:
                raise SceneError(f"{path}: axisAlignment has {len(values)} values, not 16")
            return np.array([float(v) for v in values]).reshape(4, 4)
    return None


def read_label_map(path: str | Path) -> dict[str, int]:
    """``raw_category -> nyu40id`` of ScanNet's ``scannetv2-labels.combined.tsv``."""
    import csv

    with open(path, newline="") as file:
        return {row["raw_category"]: int(row["nyu40id"]) for row in csv.DictReader(file, delimiter="\t")}


def _boxes(xyz: np.ndarray, instance_ids: np.ndarray, object_labels: dict[int, int], count: int) -> np.ndarray:
    boxes = np.zeros((count, 8))
    for object_id, label in object_labels.items():
        points = xyz[instance_ids == object_id]
        if len(points) == 0:
            continue
        low, high = points.min(0), points.max(0)
        boxes[object_id - 1] = [*((low + high) / 2), *(high - low), label, object_id - 1]
    return boxes


def convert_scene(scan: str | Path, label_map: dict[str, int], max_points: int = MAX_NUM_POINT) -> dict[str, np.ndarray]:
    """One raw scan folder ``scans/<scene>`` as ScanRefer's ``batch_load_scannet_data.py`` exports it: the
    per-scene arrays ``vert`` and ``aligned_vert`` ``[N, 9]`` float32 (xyz, rgb 0-255, normal; aligned by the
    scan's axisAlignment), ``sem_label`` (NYU40 id) and ``ins_label`` (object id + 1, 0 unannotated) uint32,
    ``bbox`` and ``aligned_bbox`` ``[K, 8]`` (centre, size, NYU40 id, object id) of the objects whose NYU40 id
    is in :data:`NYU40_IDS`, boxes computed from all vertices, then at most ``max_points`` vertices kept (a
    random subset seeded by the scene's name, so a rerun writes the same arrays). Unlike the reference, the box
    filter also applies to a scene of one box. Raises :class:`SceneError` naming the file at fault."""
    import json
    import zlib

    scan = Path(scan)
    scene = scan.name
    mesh, segs, aggregation, meta = (scan / f"{scene}{suffix}" for suffix in (
        "_vh_clean_2.ply", "_vh_clean_2.0.010000.segs.json", ".aggregation.json", ".txt"))  # fmt: skip
    for path in (mesh, meta):
        if not path.is_file():
            raise SceneError(f"{path} is missing")
    vertices, faces = read_ply(mesh)
    xyz = np.stack([vertices["x"], vertices["y"], vertices["z"]], 1).astype(np.float32)
    rgb = np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1).astype(np.float32)
    points = np.concatenate([xyz, rgb, vertex_normals(xyz, faces)], 1)
    if not np.isfinite(points).all():
        raise SceneError(f"{mesh} holds NaN or infinite values")
    alignment = read_axis_alignment(meta)
    aligned = points.copy()
    if alignment is not None:
        aligned[:, 0:3] = np.concatenate([xyz, np.ones((len(xyz), 1), np.float32)], 1) @ alignment.T[:, 0:3]
    count = len(points)
    semantic = np.zeros(count, dtype=np.uint32)
    instance = np.zeros(count, dtype=np.uint32)
    if aggregation.is_file():
        try:
            groups = json.loads(aggregation.read_text())["segGroups"]
            indices = np.asarray(json.loads(segs.read_text())["segIndices"])
        except FileNotFoundError:
            raise SceneError(f"{segs} is missing") from None
        except (ValueError, KeyError, TypeError) as error:
            raise SceneError(f"{aggregation} or {segs} is not ScanNet's JSON ({type(error).__name__}: {error})") from None
        if len(indices) != count:
            raise SceneError(f"{segs} labels {len(indices)} vertices, {mesh} has {count}")
        segment_vertices: dict[int, np.ndarray] = {}
        order = np.argsort(indices, kind="stable")
        keys, starts = np.unique(indices[order], return_index=True)
        for key, part in zip(keys.tolist(), np.split(order, starts[1:])):
            segment_vertices[key] = part

        def vertices_of(segments: list[int]) -> np.ndarray:
            missing = [s for s in segments if s not in segment_vertices]
            if missing:
                raise SceneError(f"{aggregation} names segment {missing[0]}, which {segs} does not have")
            return np.concatenate([segment_vertices[s] for s in segments]) if segments else np.zeros(0, np.int64)

        by_label: dict[str, list[int]] = {}
        for group in groups:
            by_label.setdefault(group["label"], []).extend(group["segments"])
        for label, segments in by_label.items():
            if label not in label_map:
                raise SceneError(f"{aggregation}: label {label!r} is not in scannetv2-labels.combined.tsv")
            semantic[vertices_of(segments)] = label_map[label]
        object_labels: dict[int, int] = {}
        for group in groups:
            object_id = int(group["objectId"]) + 1
            for segment in group["segments"]:
                chosen = vertices_of([segment])
                instance[chosen] = object_id
                object_labels.setdefault(object_id, int(semantic[chosen][0]) if len(chosen) else 0)
        objects = len(set(object_labels))
        if object_labels and max(object_labels) > objects:
            raise SceneError(f"{aggregation}: object ids are not 0..{objects - 1}")
        boxes = _boxes(points[:, 0:3], instance, object_labels, objects)
        aligned_boxes = _boxes(aligned[:, 0:3], instance, object_labels, objects)
        keep = np.isin(boxes[:, 6], NYU40_IDS)
        boxes, aligned_boxes = boxes[keep], aligned_boxes[keep]
    else:  # ScanNet's test scans have no annotation
        boxes = aligned_boxes = np.zeros((0, 8))
    if count > max_points:
        chosen = np.random.default_rng(zlib.crc32(scene.encode())).choice(count, max_points, replace=False)
        points, aligned, semantic, instance = points[chosen], aligned[chosen], semantic[chosen], instance[chosen]
    return {"vert": points, "aligned_vert": aligned, "sem_label": semantic, "ins_label": instance,
            "bbox": boxes, "aligned_bbox": aligned_boxes}  # fmt: skip


SCENE_ARRAYS = ("vert", "aligned_vert", "sem_label", "ins_label", "bbox", "aligned_bbox")

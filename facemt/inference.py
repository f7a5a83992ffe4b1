"""Loading a run folder and predicting all heads in one forward pass."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from facemt.checkpoint import load_checkpoint, read_config, resolve_run
from facemt.config import PRIORS
from facemt.engines import ENGINES, OnnxModel, matching_graph, onnxruntime_available, quantize_int8
from facemt.errors import FacemtError
from facemt.images import ImageInput, as_rgb_image
from facemt.tasks import PERSON_HEADS, TASKS, check_schema, class_prior, per_person
from facemt.faces import Face, face_to_photo, framing
from facemt.synth import draw_face, make_person
from facemt.transforms import PreprocessConfig, build_transform, face_images

if TYPE_CHECKING:  # the ONNX path (--engine auto with a shipped graph) never imports PyTorch or timm
    import pandas as pd
    import torch

    from facemt.explain import Explanation
    from facemt.model import MultiTaskNet


#: What facemt promises across batchings, shardings, thread counts and engines (README, "Scaling out"): the
#: same labels and rows in the same order, and probabilities equal to within this absolute tolerance. The
#: convolution kernels of some CPUs round differently for different batch sizes, so the last digits of a
#: probability may differ; a label differs only where two classes are tied to within the tolerance.
PROBABILITY_TOLERANCE = 1e-5


def resolve_device(name: str = "auto") -> "torch.device":
    """``auto`` picks CUDA when present, else the CPU.

    Raises:
        FacemtError: an unknown device, or CUDA asked for where there is none.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FacemtError(f"unknown device {name!r} (use auto, cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):
        raise FacemtError(f"unknown device {name!r} (use auto, cpu or cuda)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FacemtError(f"--device {name}: this machine has no CUDA GPU that PyTorch can use (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FacemtError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device



def own_prior(config: Mapping[str, Any]) -> str:
    """The prior a run's probabilities follow as trained: ``balanced`` when its
    loss was logit-adjusted (``balance_classes``), else ``training``."""
    return "balanced" if config.get("train", {}).get("balance_classes") else "training"


def prior_weights(config: Mapping[str, Any], prior: str | None) -> dict[str, np.ndarray]:
    """Per head, the factors that move a run's probabilities to ``prior``.

    ``training``: each class as common as it was in the run's training rows
    (its recorded ``class_counts``); ``balanced``: every class equally common.
    A probability vector times the factors, renormalised, is the softmax of
    the calibrated logits plus the log ratio of the two priors (Menon et al.
    2021). Empty when ``prior`` is None or the run's own.

    Raises:
        FacemtError: unknown prior, or a run that does not record its class counts.
    """
    if prior is None or prior == own_prior(config):
        return {}
    if prior not in PRIORS:
        raise FacemtError(f"unknown prior {prior!r}: choose {' or '.join(PRIORS)}")
    counts = config.get("class_counts")
    if not counts:
        raise FacemtError(f"prior {prior!r} needs the run's training class counts, which this run does not record "
                          "(it predates them): retrain it, or predict under its own prior")
    frequencies = {t: class_prior(c) for t, c in counts.items()}
    return {t: f if prior == "training" else 1.0 / f for t, f in frequencies.items()}


def reweight(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """N x classes probabilities multiplied by per-class ``weights`` and
    renormalised: the softmax of the logits plus ``log weights``."""
    moved = probs * weights
    return (moved / moved.sum(1, keepdims=True)).astype(probs.dtype)


def predict_images(
    model: "MultiTaskNet | OnnxModel",
    images: Sequence[np.ndarray],
    preprocess: PreprocessConfig,
    batch_size: int = 64,
    device: "torch.device | str" = "cpu",
    tta: bool = False,
    weights: Mapping[str, np.ndarray] | None = None,
    jitter: bool = False,
) -> dict[str, np.ndarray]:
    """Class probabilities per head for cached images (N x classes arrays),
    with a PyTorch model or an ONNX Runtime one: the same batches, mirror
    images and priors for both.

    ``tta``: also run each face mirrored left-right and average the two
    probability vectors (test-time augmentation; twice the network time).
    ``weights``: per head, factors the probabilities are multiplied by and
    renormalised (:func:`prior_weights`).
    ``jitter``: also run each face framed slightly differently (:data:`JITTER`:
    the alignment noise of the detector) and average all framings' probabilities.
    """
    network = _network(model, device)
    transform = build_transform(preprocess, "none")
    out: dict[str, list[np.ndarray]] = {t: [] for t in model.tasks}
    for start in range(0, len(images), batch_size):
        batch = np.stack([transform.array(im) for im in images[start : start + batch_size]])
        views = [batch] + (jittered(batch) if jitter else [])
        if tta:
            views += [np.ascontiguousarray(v[..., ::-1]) for v in views]
        outputs = [network(v) for v in views]
        probabilities = {t: sum(o[t] for o in outputs) / len(outputs) for t in outputs[0]}
        for t, probs in probabilities.items():
            out[t].append(probs)
    probs = {t: np.concatenate(v) if v else np.zeros((0, TASKS[t].num_classes)) for t, v in out.items()}
    for t, w in (weights or {}).items():
        if t in probs and len(probs[t]):
            probs[t] = reweight(probs[t], w)
    return probs


#: Framings averaged with ``jitter``: (shift x, shift y) as a fraction of the network input's side, and
#: scale about its centre. 1 % of a 112-pixel input is 1.1 px, about 3 % of the canonical eye distance
#: (0.30 of the side): the size of the detector's own landmark noise.
JITTER = ((0.01, 0.0, 1.0), (-0.01, 0.0, 1.0), (0.0, 0.01, 1.0), (0.0, -0.01, 1.0), (0.0, 0.0, 1.04),
          (0.0, 0.0, 0.96))


def jittered(batch: np.ndarray) -> list[np.ndarray]:
    """The N x 3 x S x S network inputs re-framed by each of :data:`JITTER` (border replicated)."""
    import cv2

    side = batch.shape[-1]
    out = []
    for dx, dy, scale in JITTER:
        matrix = np.array([[scale, 0, (1 - scale) * (side - 1) / 2 + dx * side],
                           [0, scale, (1 - scale) * (side - 1) / 2 + dy * side]], dtype=np.float64)
        views = [cv2.warpAffine(np.ascontiguousarray(face.transpose(1, 2, 0)), matrix, (side, side),
                                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) for face in batch]
        out.append(np.ascontiguousarray(np.stack(views).transpose(0, 3, 1, 2)))
    return out


def _network(model: "MultiTaskNet | OnnxModel", device: "torch.device | str") -> Callable[[np.ndarray], dict]:
    """N x 3 x S x S float32 batch -> per head N x classes probabilities, for either engine."""
    if isinstance(model, OnnxModel):
        return model.probabilities
    import torch

    model.eval()

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {t: p.cpu().numpy() for t, p in model.probabilities(torch.from_numpy(batch).to(device)).items()}

    return run


def _answers(probs: Mapping[str, np.ndarray], i: int) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Row ``i`` of per-head probabilities as (label per head, {class: probability} per head)."""
    labels = {t: TASKS[t].classes[int(np.argmax(p[i]))] for t, p in probs.items()}
    return labels, {t: {c: float(v) for c, v in zip(TASKS[t].classes, p[i])} for t, p in probs.items()}


def _frame(image: ImageInput, preprocess: PreprocessConfig, **options: Any) -> list[tuple[Face | None, np.ndarray]]:
    """(face, prepared array) per face of one input, framed by the crop policy."""
    picture = as_rgb_image(image, None if preprocess.policy.detects else preprocess.working_side)
    return face_images(picture, preprocess, **options)


def calibration_batches(
    preprocess: PreprocessConfig, images: Sequence[ImageInput] | None = None, batch_size: int = 16
) -> list[np.ndarray]:
    """Network inputs for int8 calibration: the largest face of each of
    ``images`` (default: 64 generated faces, every expression) framed by the
    crop policy and normalised as for prediction."""
    if images is None:
        rng = np.random.default_rng(0)
        people = [make_person(i, TASKS["age_group"].classes[i % 3], TASKS["gender"].classes[i % 2], rng)
                  for i in range(16)]
        expressions = TASKS["expression"].classes
        images = [np.asarray(draw_face(people[i // 4], expressions[i % len(expressions)], rng)) for i in range(64)]
    transform = build_transform(preprocess, "none")
    tensors = [transform.array(_frame(im, preprocess, largest_only=True, fallback=True)[0][1]) for im in images]
    return [np.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]


@dataclass
class Prediction:
    """All heads' answers for one image.

    Attributes:
        source: the file path, or None for in-memory images.
        labels: task -> predicted class name.
        probabilities: task -> {class name: probability}, summing to 1 per task.
        error: set (and labels empty) when the image could not be read.
        face: index of the face in the image (0 = largest) when faces were detected.
        box: that face's (x, y, width, height) in the original image's pixels.
        no_face: detection found no face (labels empty).
        landmarks: the face's five points (eyes, nose tip, mouth corners) in
            the original image's pixels.
        score: the detector's confidence.
        framing: ``aligned``, ``boxed`` or ``whole`` (the picture was used as is).
    """

    source: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    face: int | None = None
    box: tuple[int, int, int, int] | None = None
    no_face: bool = False
    landmarks: list[list[float]] | None = None
    score: float | None = None
    framing: str | None = None

    def set_face(self, face: Face | None, index: int | None, preprocess: PreprocessConfig) -> None:
        """Record which face this is and how it was framed."""
        self.framing = framing(preprocess.policy, face)
        if face is not None:
            self.face, self.box = index, face.box
            self.landmarks = [[round(x, 1), round(y, 1)] for x, y in face.landmarks]
            self.score = round(face.score, 4)

    @property
    def status(self) -> str:
        """``ok``, ``no_face`` or ``error``."""
        return "error" if self.error else "no_face" if self.no_face else "ok"

    @property
    def age_group(self) -> str | None:
        return self.labels.get("age_group")

    @property
    def gender(self) -> str | None:
        return self.labels.get("gender")

    @property
    def expression(self) -> str | None:
        return self.labels.get("expression")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"path", "error", task: {"label", "probabilities"}}``."""
        out: dict[str, Any] = {"path": self.source, "status": self.status}
        if self.error:
            out["error"] = self.error
        if self.framing is not None:
            out["framing"] = self.framing
        if self.face is not None:
            out["face"] = self.face
            out["box"] = list(self.box) if self.box else None
            out["landmarks"] = self.landmarks
            out["score"] = self.score
        for task, label in self.labels.items():
            out[task] = {"label": label, "probabilities": self.probabilities[task]}
        return out


class Predictor:
    """A trained facemt model ready to predict.

    Faces are found and framed by the run's crop policy (``preprocess.crop``:
    ``align``, ``box`` or ``none``) unless ``crop`` overrides it, the same way
    ``fit`` framed the training images.

    Args:
        run_dir: a folder written by ``facemt fit``; None or ``"base"`` is the
            built-in base model.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: images per forward pass.
        crop: override the run's crop policy (``align``, ``box`` or ``none``).
        engine: ``auto``, ``torch``, ``onnx`` or ``onnx-int8`` (see :func:`load`);
            ``self.engine`` is the one chosen.
        tta: average each face's probabilities with its mirror image's
            (test-time augmentation, twice the network time).
        jitter: also average the face framed by each of :data:`JITTER` (seven
            times the network time; with ``tta`` fourteen).
        prior: ``balanced`` or ``training``: the class frequencies the
            probabilities assume (see :func:`load`); None: the run's own.
    """

    def __init__(
        self, run_dir: str | os.PathLike | None = None, device: str = "auto", batch_size: int = 32,
        crop: str | None = None, engine: str = "auto", tta: bool = False, prior: str | None = None,
        jitter: bool = False,
    ) -> None:
        if engine not in ENGINES:
            raise FacemtError(f"unknown engine {engine!r}: choose {', '.join(ENGINES)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FacemtError(f"batch size must be a whole number of at least 1 (got {batch_size!r})")
        self.run_dir = resolve_run(run_dir)
        self.config = read_config(self.run_dir)
        try:
            self.preprocess = PreprocessConfig.from_dict(self.config["preprocess"])
            tasks = check_schema(self.config["tasks"])
        except (TypeError, ValueError, AttributeError) as exc:
            raise FacemtError(f"{self.run_dir / 'config.json'}: invalid field ({exc})") from None
        if crop is not None and crop != self.preprocess.crop:
            self.preprocess = dataclasses.replace(self.preprocess, crop=crop)
        self.batch_size = batch_size
        self.engine, graph = self._engine(engine, device)
        self.tta, self.jitter = tta, jitter
        self.prior = prior or own_prior(self.config)
        self.class_weights = prior_weights(self.config, prior)
        self.requested_engine, self._torch = engine, None
        if self.engine == "torch":
            self.device = resolve_device(device)
            self.model = load_checkpoint(self.run_dir, map_location=self.device)[0]
        else:
            if device not in ("auto", "cpu"):
                raise FacemtError(f"--engine {self.engine} runs on the CPU: drop --device {device} or use --engine torch")
            self.device = "cpu"
            self.model = self._onnx_model(self.engine, tasks, graph)

    def _engine(self, engine: str, device: str) -> tuple[str, Path | None]:
        """The engine to run, and the folder's matching graph when it is ONNX and one was found (checked
        once here). ``auto``: ONNX Runtime on the CPU when the folder holds a graph exported from these
        weights (no PyTorch import, a fast start), else PyTorch."""
        if engine == "torch" or (engine == "auto" and (device not in ("auto", "cpu") or not onnxruntime_available())):
            return "torch", None
        found = matching_graph(self.run_dir, "onnx" if engine == "auto" else engine, self.config["weights_sha256"])
        if engine == "auto":
            return ("onnx", found) if found is not None else ("torch", None)
        return engine, found

    def _onnx_model(self, engine: str, tasks: Sequence[str], found: Path | None) -> OnnxModel:
        """The run's exported graph when ``facemt export`` wrote it from these
        weights, else one built now (int8: calibrated on generated faces)."""
        if found is not None:
            return OnnxModel(found, tasks)
        from facemt.model import write_onnx

        model = load_checkpoint(self.run_dir)[0]
        with tempfile.TemporaryDirectory() as tmp:
            graph = Path(tmp) / "model.onnx"
            write_onnx(model, self.preprocess.image_size, graph)
            if engine == "onnx-int8":
                quantize_int8(graph, Path(tmp) / "int8.onnx", calibration_batches(self.preprocess))
                graph = Path(tmp) / "int8.onnx"
            return OnnxModel(graph.read_bytes(), tasks)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.model.tasks)

    def torch_model(self, purpose: str = "explanations") -> "MultiTaskNet":
        """The PyTorch network (explanations need gradients, the person-relative classifier the trunk's
        features): this predictor's own, or with ``engine="auto"`` the folder's weights loaded on first use.

        Raises:
            FacemtError: the predictor was asked for an ONNX engine by name.
        """
        if self.engine == "torch":
            return self.model
        if self.requested_engine != "auto":
            raise FacemtError(f"{purpose} need PyTorch, which --engine {self.engine} does not run: use --engine torch "
                              "(or auto)")
        if self._torch is None:
            self._torch = load_checkpoint(self.run_dir)[0]
        return self._torch

    def explain(self, image: ImageInput, targets: Mapping[str, str] | None = None, method: str | None = None,
                all_faces: bool = False) -> "Explanation | list[Explanation]":
        """Per head, where in the face the evidence for a class lies (see :mod:`facemt.explain`).

        Args:
            image: a path, PIL image or array.
            targets: task -> class to explain (default: each head's predicted class).
            method: one of :data:`facemt.explain.METHODS` (default: :data:`facemt.explain.DEFAULT_METHOD`).
            all_faces: every face found (a list), not only the largest.

        Returns:
            an :class:`facemt.explain.Explanation` (its ``maps`` are MAP_SIDE x MAP_SIDE arrays in the aligned
            frame; ``to_photo`` maps them back onto the photo), or a list with ``all_faces``.

        Raises:
            FacemtError: unreadable image, unknown target or method, an ONNX engine asked for by name.
        """
        import torch

        from facemt.explain import DEFAULT_METHOD, Explanation, head_maps, map_to_input

        model = self.torch_model()
        unknown = set(targets or {}) - set(self.tasks)
        if unknown:
            raise FacemtError(f"no {', '.join(sorted(unknown))} head to explain (the model has {', '.join(self.tasks)})")
        wanted = {t: TASKS[t].index(c) for t, c in (targets or {}).items()}
        picture = as_rgb_image(image, None if self.preprocess.policy.detects else self.preprocess.working_side)
        framed = face_images(picture, self.preprocess, largest_only=not all_faces, fallback=True)
        arrays = [a for _, a in framed]
        probs = predict_images(model, arrays, self.preprocess, self.batch_size, self.device, self.tta,
                               self.class_weights, self.jitter)
        transform = build_transform(self.preprocess, "none")
        batch = torch.from_numpy(np.stack([transform.array(a) for a in arrays])).to(next(model.parameters()).device)
        chosen = {t: [wanted.get(t, int(np.argmax(p))) for p in probs[t]] for t in self.tasks}
        maps = head_maps(model, batch, chosen, method or DEFAULT_METHOD)
        out = []
        for i, (face, array) in enumerate(framed):
            labels, probabilities = _answers(probs, i)
            network_input = transform.image(array)
            to_photo = (face_to_photo(picture.size, face, self.preprocess.policy, self.preprocess.working_side,
                                      self.preprocess.image_size)
                        @ transform.input_to_image(array) @ map_to_input(self.preprocess.image_size))
            out.append(Explanation(
                self._source(image), labels, probabilities, {t: TASKS[t].classes[chosen[t][i]] for t in self.tasks},
                {t: maps[t][i] for t in self.tasks}, network_input, to_photo[:2],
                face=i if face is not None else None, box=face.box if face is not None else None,
                framing=framing(self.preprocess.policy, face)))
        return out if all_faces else out[0]

    def options(self, **predict_options: Any) -> dict[str, Any]:
        """What decides this predictor's answers (the weights' SHA-256, engine,
        framing, ``tta``, ``prior``) plus ``predict_options``: recorded with
        each shard so that parts of different predictions are never merged."""
        return {"weights_sha256": self.config.get("weights_sha256"), "engine": self.engine,
                "crop": self.preprocess.crop, "tta": self.tta, "jitter": self.jitter, "prior": self.prior,
                **predict_options}

    @property
    def person_relative(self) -> bool:
        """Whether the run carries the person-relative expression classifier (``fit --person-relative``)."""
        return "person_relative" in self.config and "expression" in self.tasks

    def probabilities(self, arrays: Sequence[np.ndarray], persons: Sequence[object | None] | None = None
                      ) -> dict[str, np.ndarray]:
        """Class probabilities per head (N x classes) for faces already framed
        and cached (:func:`facemt.engine.decode_images`), with this
        predictor's engine, ``tta`` and ``prior``. With ``persons`` (each face's
        person, None where unknown), the faces of a person share one answer for
        age group and gender (:func:`facemt.tasks.per_person`: the mean of their
        log-probabilities), and with a run carrying the person-relative
        classifier, expression is read against the same person's other faces
        among ``arrays`` (:mod:`facemt.relative`) wherever it can be."""
        probs = predict_images(self.model, arrays, self.preprocess, self.batch_size, self.device, self.tta,
                               self.class_weights, self.jitter)
        if persons is not None:
            probs.update({t: per_person(p, persons) for t, p in probs.items() if t in PERSON_HEADS})
        if persons is not None and self.person_relative:
            from facemt.relative import with_person_relative

            model = self.torch_model("person-relative expression answers")
            probs["expression"] = with_person_relative(model, arrays, self.preprocess, persons, probs["expression"])
        return probs

    def predict_persons(self, paths: Sequence[str | os.PathLike], persons: Sequence[object | None],
                        fallback: bool = False, min_face: int = 0) -> list[Prediction]:
        """The largest face of each image file, knowing each file's person: as :meth:`predict_files`
        answers them, except that a person's faces share one age group and gender answer and a run
        carrying the person-relative classifier reads expression against the same person's other
        faces (persons with its ``min_pictures`` or more faces found).
        Every face is held in memory until all are framed (a person's pictures are read together)."""
        if len(paths) != len(persons):
            raise FacemtError(f"{len(paths)} files but {len(persons)} persons")
        preds, arrays, who = [], [], []
        for path, person in zip(paths, persons):
            try:
                units = _frame(path, self.preprocess, largest_only=True, fallback=fallback, min_face=min_face)
            except FacemtError as exc:
                preds.append(Prediction(str(path), error=str(exc)))
                continue
            if not units:
                preds.append(Prediction(str(path), no_face=True))
                continue
            pred = Prediction(str(path))
            pred.set_face(units[0][0], 0 if self.preprocess.policy.detects else None, self.preprocess)
            preds.append(pred)
            arrays.append(units[0][1])
            who.append(person)
        if arrays:
            probs = self.probabilities(arrays, who)
            for i, pred in enumerate(p for p in preds if p.status == "ok"):
                pred.labels, pred.probabilities = _answers(probs, i)
        return preds

    def _predictions(self, arrays: Sequence[np.ndarray], sources: Sequence[str | None]) -> list[Prediction]:
        probs = self.probabilities(arrays)
        return [Prediction(src, *_answers(probs, i)) for i, src in enumerate(sources)]

    @staticmethod
    def _source(image: ImageInput) -> str | None:
        return str(image) if isinstance(image, (str, os.PathLike)) else None

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """Predict every head for one image or a list of images: the largest
        face of each, framed by the run's crop policy; an image where no face
        is found is predicted whole (its ``framing`` says ``whole``).

        Args:
            images: a path, PIL image or HxWx3 uint8 array, or a list of them.

        Returns:
            one :class:`Prediction`, or a list for a list input.

        Raises:
            FacemtError: an image cannot be read.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        units = [_frame(im, self.preprocess, largest_only=True, fallback=True)[0] for im in items]
        results = self._predictions([a for _, a in units], [self._source(im) for im in items])
        for (face, _), r in zip(units, results):
            r.set_face(face, 0, self.preprocess)
        return results[0] if single else results

    def predict_faces(
        self, image: ImageInput, fallback: bool = False, min_face: int = 0, max_faces: int | None = None
    ) -> list[Prediction]:
        """Every face of a photo (largest first), each framed by the crop policy.

        Args:
            image: a path, PIL image or array.
            fallback: when no face is found, predict on the whole image instead
                of returning an empty list.
            min_face: ignore faces narrower than this many pixels.
            max_faces: at most this many faces (the largest).
        """
        units = _frame(image, self.preprocess, largest_only=False, fallback=fallback, min_face=min_face,
                       max_faces=max_faces)
        preds = self._predictions([a for _, a in units], [self._source(image)] * len(units)) if units else []
        for i, ((face, _), p) in enumerate(zip(units, preds)):
            p.set_face(face, i, self.preprocess)
        return preds

    def predict_files(
        self,
        paths: Iterable[str | os.PathLike],
        fallback: bool = False,
        min_face: int = 0,
        max_faces: int | None = None,
    ) -> Iterator[Prediction]:
        """Stream predictions for many files, in input order and in batches:
        one per face found (framed by the crop policy; policy ``none`` gives one
        per file), a ``no_face`` result for a file without a face.

        Args:
            paths: image files.
            fallback: predict the whole image when no face is found.
            min_face, max_faces: see :meth:`predict_faces`.

        An unreadable file yields a Prediction with ``error`` set instead of
        stopping the run. Memory is bounded by one batch.
        """
        slots: list[Prediction] = []
        arrays: list[np.ndarray] = []

        def flush() -> Iterator[Prediction]:
            waiting = [p for p in slots if p.status == "ok" and not p.labels]
            if waiting:
                for p, done in zip(waiting, self._predictions(arrays, [p.source for p in waiting])):
                    p.labels, p.probabilities = done.labels, done.probabilities
            yield from slots
            slots.clear()
            arrays.clear()

        for path in paths:
            try:
                units = _frame(path, self.preprocess, largest_only=False, fallback=fallback, min_face=min_face,
                               max_faces=max_faces)
            except FacemtError as exc:
                slots.append(Prediction(str(path), error=str(exc)))
                units = None
            if units is not None and not units:
                slots.append(Prediction(str(path), no_face=True))
            for i, (face, array) in enumerate(units or []):
                pred = Prediction(str(path))
                pred.set_face(face, i if self.preprocess.policy.detects else None, self.preprocess)
                slots.append(pred)
                arrays.append(array)
            if len(arrays) >= self.batch_size:
                yield from flush()
        yield from flush()

    def predict_video(self, path: str | os.PathLike, fps: float | None = None, smooth: float | None = None,
                      fallback: bool = False, min_face: int = 0, max_faces: int | None = None,
                      per_track: bool = False) -> "pd.DataFrame":
        """Every face of every sampled frame of a video, as a pandas DataFrame (one row per face per frame:
        ``path, frame, time_s, track, face, status, box, landmarks``, labels and per-class probabilities;
        see :func:`facemt.video.predict_video` for the arguments).

        Raises:
            FacemtError: the video cannot be read or is truncated.
        """
        from facemt.video import predict_video, to_frame

        rows = list(predict_video(self, path, fps=fps, smooth=smooth, fallback=fallback, min_face=min_face,
                                  max_faces=max_faces, per_track=per_track))
        return to_frame(rows, self.tasks)


def load(
    run_dir: str | os.PathLike | None = None, device: str = "auto", batch_size: int = 32, crop: str | None = None,
    engine: str = "auto", tta: bool = False, prior: str | None = None, jitter: bool = False,
) -> Predictor:
    """Load a run folder written by ``facemt fit``, or with no argument (or
    ``"base"``) the built-in base model shipped with facemt.

    Args:
        crop: override the run's crop policy (``align``, ``box``, ``none``).
        engine: ``auto`` (the default: ONNX Runtime when the folder holds a
            ``model.onnx`` exported from its weights, as the built-in model
            does, and ``device`` is ``auto`` or ``cpu``; PyTorch and timm are
            then never imported; else PyTorch), ``torch`` (PyTorch, any
            device), ``onnx`` (ONNX Runtime, float32, CPU) or ``onnx-int8``
            (ONNX Runtime, int8, CPU). The ONNX engines use the run's
            ``model.onnx`` / ``model.int8.onnx`` written by ``facemt export``
            when present, else build the graph at load (a few seconds).
        tta: average each face's probabilities with its mirror image's
            (test-time augmentation; twice the network time).
        jitter: also average the face framed slightly differently
            (:data:`JITTER`: shifts of 1 % of the input and scales of +-4 %,
            the detector's own alignment noise; seven times the network time).
        prior: the class frequencies the probabilities assume. ``balanced``:
            every class equally likely before the face is seen (what a run
            trained with ``balance_classes`` predicts, the built-in model
            included; suits sets with every class about equally common, such
            as posed expression sets). ``training``: classes as common as in
            the run's training data (FER+'s 40 % neutral faces for the
            built-in model; suits photos taken the way the training data
            were). None: the run's own.

    Raises:
        FacemtError: the folder is not a valid facemt checkpoint, or ``prior``
            is unknown or needs class counts the run does not record.
    """
    return Predictor(run_dir, device=device, batch_size=batch_size, crop=crop, engine=engine, tta=tta, prior=prior,
                     jitter=jitter)


__all__ = ["PRIORS", "Prediction", "Predictor", "load", "prior_weights"]

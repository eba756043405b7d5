"""A LAVIS video processor for worlds whose captions describe motion: ``evlgen_video_headtail``.

LAVIS's ``alpro_video_train`` draws EVLGen-video's training frames ("headtail": two random frames
from each half of the clip, sorted) but then augments them in ways that change what a motion
caption says: ``RandomHorizontalFlipVideo`` turns "moves left" into "moves right",
``VideoRandomAugment`` draws the sign of its TranslateX/Y, ShearX/Y and Rotate anew for every frame
(so still shapes jump between frames) and its Equalize/AutoContrast/Brightness shift colours.
``evlgen_video_headtail`` keeps the headtail sampling and applies ``alpro_video_eval``'s transform
instead (decord resizes while decoding, then [0, 1] scaling and CLIP normalisation), the same
choice the image shapes world makes with ``blip_image_eval`` for training.
"""
from lavis.common.registry import registry
from lavis.datasets.data_utils import load_video
from lavis.processors.alpro_processors import AlproVideoEvalProcessor


@registry.register_processor("evlgen_video_headtail")
class VideoHeadtailProcessor(AlproVideoEvalProcessor):
    """Video path -> float [C, T, image_size, image_size]: ``n_frms`` frames by headtail sampling
    (``n_frms`` must be even), with ``alpro_video_eval``'s transform. Options as ``alpro_video_eval``:
    ``image_size``, ``n_frms``, ``mean``, ``std``."""

    sampling = "headtail"

    def __call__(self, vpath):
        clip = load_video(video_path=vpath, n_frms=self.n_frms, height=self.image_size, width=self.image_size,
                          sampling=self.sampling)
        return self.transform(clip)

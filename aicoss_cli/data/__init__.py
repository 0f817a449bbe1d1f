"""Data: the DACON layout read and checked (tables), THE image decoder and the image checks
(images), augmentation (transforms), images into the model (loading), the scores CSVs (submission),
the train/val split and K folds (splits), which rows each process trains on (samplers), the same
image under two ids (duplicates), and the demo set.

Nothing here knows about models or recipes.
"""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "demo": ["build_demo_data"],
    "duplicates": ["describe_same_images", "same_images"],
    "images": ["check_images", "decode_batch", "decode_image", "eight_bits", "to_rgb"],
    "loading": ["IMAGENET_MEAN", "IMAGENET_STD", "ImageBatches", "ImageDataset", "Normalizer", "normalize"],
    "samplers": ["TrainBatches", "make_loader", "shard"],
    "splits": ["SEED_SPLIT", "fold_assignment", "fold_record", "split_fingerprint", "split_from_record",
               "split_indices", "split_record", "training_rows"],
    "submission": ["ScoreTable", "read_labels_csv", "read_probabilities_csv", "write_scores_csv"],
    "tables": ["LabeledTable", "TestTable", "read_image_list", "read_test", "read_train"],
    "transforms": ["Cutout", "build_train_transform"],
})

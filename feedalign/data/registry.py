"""The datasets by the original's names: where their files lie, how to read and fetch them.

`DATASETS` maps a canonical name to a `DatasetInfo`; `get_dataset` looks a name up
case-insensitively and lists the valid names when it is unknown. Files lie under
`<datapath>/<folder>/` exactly as the official archives unpack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from feedalign.data import formats
from feedalign.data.formats import RawSplit

Reader = Callable[[Path, Sequence[str], str], RawSplit]


@dataclass(frozen=True)
class Remote:
    """One official download: a plain file, or a .tar.gz unpacked into the folder."""

    url: str  # the official address
    md5: str = ""  # as published by the data set's authors (or sha256)
    provides: str = ""  # path (relative to the folder) the download installs
    unpack: bool = False  # a tar archive whose top folder is `provides`
    sha256: str = ""  # checked instead of md5 where given

    @property
    def digest(self) -> tuple[str, str]:
        """(hash name, expected hex digest): SHA-256 where published, else MD5."""
        return ("sha256", self.sha256) if self.sha256 else ("md5", self.md5)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # canonical name, as the original spells it
    folder: str  # under datapath
    reader: Reader
    splits: dict[str, tuple[str, ...]]  # "train" / "test" / "extra" -> files, relative to folder
    shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[str, ...]
    sizes: dict[str, int]  # official number of images per split (documentation, logs)
    remotes: tuple[Remote, ...] = ()  # empty: bundled, nothing to download
    coarse_classes: tuple[str, ...] | None = None
    # `validate=True` holds out the last n_validation training images (docs/original.md §5: 10k).
    n_validation: int = 10_000
    kind: str = "image"  # "text": one UTF-8 file of characters (feedalign/data/text.py)


DIGIT_NAMES = tuple(str(d) for d in range(10))
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck")  # fmt: skip
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
STL10_NAMES = ("airplane", "bird", "car", "cat", "deer",
               "dog", "horse", "monkey", "ship", "truck")  # fmt: skip
# CIFAR-100's fine_label_names.txt / coarse_label_names.txt, in label order.
CIFAR100_NAMES = tuple(
    """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split()
)
CIFAR100_COARSE_NAMES = tuple(
    """
aquatic_mammals fish flowers food_containers fruit_and_vegetables
household_electrical_devices household_furniture insects large_carnivores
large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores
medium_mammals non-insect_invertebrates people reptiles small_mammals trees
vehicles_1 vehicles_2
""".split()
)
assert len(CIFAR100_NAMES) == 100 and len(CIFAR100_COARSE_NAMES) == 20


def _text_not_images(folder: Path, files: Sequence[str], split: str) -> RawSplit:
    raise formats.DatasetError(
        f"{folder}: a text dataset has characters, not images; read it with feedalign.data.text.load_text"
    )


def _idx_splits() -> dict[str, tuple[str, ...]]:
    return {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }


def _idx_remotes(base: str, md5s: Sequence[str]) -> tuple[Remote, ...]:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # fmt: skip
    return tuple(Remote(base + n, md5=m, provides=n) for n, m in zip(names, md5s, strict=True))


def _idx_dataset(name: str, base: str, classes: tuple[str, ...], md5s: Sequence[str]) -> DatasetInfo:
    """MNIST and Fashion-MNIST: the same four idx files, 28×28 grey, 60k / 10k."""
    return DatasetInfo(name=name, folder=name, reader=formats.read_idx_split, splits=_idx_splits(),
                       shape=(1, 28, 28), classes=classes, sizes={"train": 60_000, "test": 10_000},
                       remotes=_idx_remotes(base, md5s))  # fmt: skip


# MNIST's original home, http://yann.lecun.com/exdb/mnist/, no longer serves the files;
# the byte-identical mirror below is the one torchvision uses.
MNIST_BASE = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SVHN_BASE = "http://ufldl.stanford.edu/housenumbers/"

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        _idx_dataset(
            "MNIST",
            MNIST_BASE,
            DIGIT_NAMES,
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
        ),  # fmt: skip
        _idx_dataset(
            "FashionMNIST",
            FASHION_BASE,
            FASHION_NAMES,
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
        ),  # fmt: skip
        DatasetInfo(
            name="Cifar10",
            folder="Cifar10",
            reader=formats.read_cifar10_split,
            splits={
                "train": tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)),
                "test": ("cifar-10-batches-bin/test_batch.bin",),
            },
            shape=(3, 32, 32),
            classes=CIFAR10_NAMES,
            sizes={"train": 50_000, "test": 10_000},
            remotes=(
                Remote(
                    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                    md5="c32a1d4ab5d03f1284b67883e8d87530",
                    provides="cifar-10-batches-bin",
                    unpack=True,
                ),
            ),  # fmt: skip
        ),
        DatasetInfo(
            name="Cifar100",
            folder="Cifar100",
            reader=formats.read_cifar100_split,
            splits={
                "train": ("cifar-100-binary/train.bin",),
                "test": ("cifar-100-binary/test.bin",),
            },
            shape=(3, 32, 32),
            classes=CIFAR100_NAMES,
            coarse_classes=CIFAR100_COARSE_NAMES,
            sizes={"train": 50_000, "test": 10_000},
            remotes=(
                Remote(
                    "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                    md5="03b5dce01913d631647c71ecec9e9cb8",
                    provides="cifar-100-binary",
                    unpack=True,
                ),
            ),  # fmt: skip
        ),
        DatasetInfo(
            name="SVHN",
            folder="SVHN",
            reader=formats.read_svhn_split,
            # docs/original.md §5: training uses train + extra (unless load_dataset(svhn_extra=False)).
            splits={
                "train": ("train_32x32.mat",),
                "extra": ("extra_32x32.mat",),
                "test": ("test_32x32.mat",),
            },
            shape=(3, 32, 32),
            classes=DIGIT_NAMES,
            sizes={"train": 73_257, "extra": 531_131, "test": 26_032},
            remotes=(
                Remote(
                    SVHN_BASE + "train_32x32.mat",
                    md5="e26dedcc434d2e4c54c9b2d4a06d8373",
                    provides="train_32x32.mat",
                ),
                Remote(
                    SVHN_BASE + "test_32x32.mat",
                    md5="eb5a983be6a315427106f1b164d9cef3",
                    provides="test_32x32.mat",
                ),
                Remote(
                    SVHN_BASE + "extra_32x32.mat",
                    md5="a93ce644f1a588dc4d68dda5feec44a7",
                    provides="extra_32x32.mat",
                ),
            ),  # fmt: skip
        ),
        DatasetInfo(
            name="STL10",
            folder="STL10",
            reader=formats.read_stl10_split,
            splits={
                "train": ("stl10_binary/train_X.bin", "stl10_binary/train_y.bin"),
                "test": ("stl10_binary/test_X.bin", "stl10_binary/test_y.bin"),
            },
            shape=(3, 96, 96),
            classes=STL10_NAMES,
            sizes={"train": 5_000, "test": 8_000},
            remotes=(
                Remote(
                    "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                    md5="91f7769df0f17e558f3565bffb0c7dfb",
                    provides="stl10_binary",
                    unpack=True,
                ),
            ),  # fmt: skip
            # Only 5,000 labelled training images: hold out the last 1,000 (the same
            # fifth as CIFAR's 10k of 50k) instead of 10k.
            n_validation=1_000,
        ),
        DatasetInfo(
            name="digits",
            folder="digits",
            reader=formats.read_digits_split,
            splits={"train": (), "test": ()},  # bundled with scikit-learn: no files
            shape=(1, 8, 8),
            classes=DIGIT_NAMES,
            sizes={"train": formats.DIGITS_TRAIN, "test": 1797 - formats.DIGITS_TRAIN},
            # Hold out the last 300 training images: the size of its test split, as
            # 10k is for MNIST and CIFAR.
            n_validation=300,
        ),
        DatasetInfo(
            name="shakespeare_char",
            folder="tinyshakespeare",  # as char-rnn's data/tinyshakespeare/ holds it
            reader=_text_not_images,
            splits={"train": ("input.txt",)},  # split 90/10 by feedalign/data/text.py
            shape=(),
            classes=(),
            sizes={"train": 1_003_854, "test": 111_540},  # characters
            remotes=(
                Remote(
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                    provides="input.txt",
                ),
            ),  # fmt: skip
            kind="text",
        ),
    ]
}


def dataset_names() -> list[str]:
    return list(DATASETS)


def get_dataset(name: str) -> DatasetInfo:
    """Look a dataset up by name, ignoring case."""
    by_lower = {key.lower(): info for key, info in DATASETS.items()}
    info = by_lower.get(str(name).lower())
    if info is None:
        raise ValueError(
            f"unknown dataset {name!r}; valid names (case-insensitive): " + ", ".join(dataset_names())
        )
    return info

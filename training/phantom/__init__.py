"""Synthetic whole-body PET/CT phantom: a deterministic test and demonstration instrument.

**What it is.** ``make_phantom(seed, size)`` builds an adult-sized body (1.67-1.78 m,
supine, head first) from analytic solids: skin, subcutaneous fat, muscle, body
cavities; a skeleton (skull, mandible, 24 vertebrae with spinous processes, sacrum,
12 pairs of ribs, sternum, clavicles, scapulae, hip bones, long bones with marrow);
organs (brain, eyes, salivary and thyroid glands, lungs cut into 18 segments, heart
with blood pool, liver cut into 8 Couinaud segments, gallbladder, spleen, stomach,
pancreas, kidneys with renal pelvis, adrenals, bowel, bladder, aorta, caval veins,
airways); and 37 lymph-node stations.  Every structure carries a CT number, an FDG
uptake (SUVbw) and a Locus anatomy-library site id, so the rasterised label maps are
ground truth for lesion localisation.  Lesions of varied size, shape and uptake are
placed in chosen or randomly drawn sites, with their masks, boxes and sites recorded.
CT (HU) and PET (SUVbw) volumes include partial-volume blur and noise.
``write_study(phantom, out_dir)`` writes the study as DICOM: CT and PET series with
complete SUV headers (the QIBA body-weight SUV reproduces the phantom's SUV) and a SEG
with one segment per lesion, optionally a localizer in another Frame of Reference; all
pass ``dciodvfy`` without errors.  The same seed gives identical voxels and UIDs.

**What it is not.** The phantom is *not anatomy*: organs are ellipsoids, tubes and
boxes at roughly the right places, lung and liver segments are cut with planes, tissue
values are typical levels rather than measurements, lesions are uniform ellipsoids, and
the imaging model (Gaussian PSF, Gaussian noise) is not a scanner simulation.  Use it to
exercise DICOM I/O, SUV arithmetic, geometry, measurement, the network path and the
localizer's plumbing, and to demonstrate Locus without patient data.  Do not use it to
claim clinical accuracy, to validate a model's anatomical knowledge, or as the only
training data of a model meant for patients.  Identifiers ("Phantom^Seed 7",
"LOCUS-PH-7") are synthetic and belong to no person.

Sizes: ``tiny`` (CT 64x64x60, PET 32x32x30, chest-abdomen, 3 lesions; unit tests),
``small`` (neck to pelvis, 5 lesions), ``demo`` (CT 192x192x200, PET 96x96x100, skull
base to thigh, 8 lesions; the node demo), ``full`` (CT 512x512x600, PET 200x200x600,
vertex to soles, 50 lesions; the analysis benchmark, under a minute and 2 GB).
Command line: ``python -m training.phantom.cli OUT_DIR --seed 7 --size demo``.
"""

from training.phantom.anatomy import STRUCTURE_SITES, Anatomy, Structure
from training.phantom.dicom_writer import WrittenStudy, write_study
from training.phantom.generate import PRESETS, Phantom, PhantomUids, make_phantom, phantom_uid
from training.phantom.lesions import LesionTruth

__all__ = [
    "PRESETS",
    "STRUCTURE_SITES",
    "Anatomy",
    "LesionTruth",
    "Phantom",
    "PhantomUids",
    "Structure",
    "WrittenStudy",
    "make_phantom",
    "phantom_uid",
    "write_study",
]

"""The lesion finder: what predict runs for a row with no drawn mask, and what measures it.

    candidates.py    connected components of a lesion-probability map, scored (probability, volume, depth),
                     ranked, the index lesion chosen or the row flagged as having no confident lesion
    search.py        the whole-head sliding-window search: probability map, brain region, candidates, the
                     index lesion written on the image's own grid
    segmentation.py  segmentation results of a fine-tuning run (per-subject metrics, overlays)
    seg_metrics.py   Dice, HD95 and volume error, misses counted
"""

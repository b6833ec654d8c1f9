"""ShapesWorld: the embedded, trained tiny text-to-image world (generator, models, judge)."""

"""What the registry's tests share: the settings of a stack that collects garbage."""

# The settings of every GC test's own stack, beside its grace and retention.
GC_STACK_SETTINGS = {
    "DUPHUNTER_GC_COMPACT_BELOW": "1.0",  # compact any pack with a dead byte
    "DUPHUNTER_PREDICTOR": "none",  # no predicted rebuild beside what the test does
}

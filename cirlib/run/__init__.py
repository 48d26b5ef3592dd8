"""The runners: papermill batches, multi-process launches, the demo. Nothing imports them.
"""

"""The training room: one loop for both stages on Accelerate (loop, schedules, checkpoints), the stage tasks, run-time
set-up. The loop modules know no models, data or retrieval; the stage tasks bring those in.
"""

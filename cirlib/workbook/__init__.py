"""The workbook room: the configs and steps the numbered notebooks call, input checks, figures, the explorer.
Sits above every other room.
"""

"""The page's own CSS: progress bars, pixelated previews of small images, table cells on one line."""

CSS = """
.sd-bar {height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; margin: 4px 0 6px 0;}
.sd-bar > div {height: 100%; background: var(--color-accent); transition: width .3s;}
.sd-status {font-size: 0.95em;}
.sd-problem {color: var(--error-text-color, #b91c1c); font-weight: 600;}
#train-previews img, #train-thumbnails img, #generate-gallery img, #library-cards img, #generate-cards img
    {image-rendering: pixelated;}
#library-cards .caption-label, #generate-cards .caption-label {max-width: 100%; white-space: normal; word-break: break-all;}
#library-table th, #library-table td {white-space: nowrap;}
"""

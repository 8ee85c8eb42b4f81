"""The text the tiny T5 tokenizer is trained on: the sample figures' caption vocabulary plus
seeded strings of everyday words, so the demo's captions tokenize into real pieces.

Lives here, beside the captions it is made from; models/ never imports tasks/.
"""
from __future__ import annotations

import random

from tasks.sample.skeleton import POSES

_WORDS = """
woman man girl boy child children person people portrait face eyes nose mouth lips teeth smile ear
ears hair beard skin cheek chin forehead neck shoulder chest back waist hip hand hands finger
fingers arm leg foot knee elbow wrist ankle body head young old elderly tall short slender muscular
curly straight long wavy dark light pale tanned freckled bald braided blonde brown black white grey
gray red orange yellow green blue purple pink violet golden silver beige cream teal navy crimson
olive turquoise colour colours color bright dim soft harsh warm cool cold hot glowing shiny matte
glossy textured smooth rough wet dry dusty sunlight moonlight daylight lamp candle neon window
shadow shadows reflection reflections highlight glare backlit silhouette contrast saturated muted
vivid pastel monochrome sepia faded grainy sharp blurry blurred focus bokeh depth field foreground
background centre center left right top bottom corner edge middle frame framed composition
symmetrical diagonal horizon vertical horizontal close closeup wide angle view shot aerial overhead
low eye level profile frontal side behind front beside between under above below near far distant
inside outside indoor outdoor studio street road alley bridge river lake sea ocean beach sand wave
waves rock rocks stone cliff mountain mountains hill hills valley forest tree trees leaf leaves
grass flower flowers garden park meadow desert snow ice rain fog mist cloud clouds sky sun moon star
stars night morning evening afternoon dawn dusk sunset sunrise winter summer spring autumn season
weather city town village house building buildings tower wall walls door doors roof floor ceiling
room kitchen bedroom table chair sofa bed shelf book books cup glass bottle plate bowl food bread
fruit apple coffee tea car bicycle bus train boat ship plane rocket astronaut helmet suit jacket
coat shirt dress skirt trousers jeans hat cap scarf gloves shoes boots glasses necklace ring bag
umbrella flag sign poster painting photo photograph drawing sketch illustration render pattern
stripes dots dotted speckled checkered floral geometric abstract particle particles cluster
scattered sparse dense layer layers texture surface metal wood wooden plastic paper fabric cotton
leather wool marble brick concrete steel iron gold cat dog horse bird birds fish cow sheep rabbit
fox deer owl duck butterfly insect animal animals wild sitting standing walking running jumping
lying kneeling crouching bending leaning reaching holding looking smiling laughing crying sleeping
reading writing playing dancing swimming climbing riding driving flying talking eating drinking
waiting watching resting working carrying pulling pushing turning stretching calm quiet busy crowded
empty lonely peaceful dramatic moody cheerful serious gentle bold simple detailed elegant rustic
modern vintage ancient classic minimal clean messy bare rich plain tiny small large huge round
square flat curved thin thick narrow heavy full half one two three four five several many few some
every each both another other same different main new first last next little and or with without of
in on at to from into onto through across along around against over toward towards is are was were
has have had its their his her this that these those there here which while where who very quite
slightly mostly partly nearly almost fully softly gently clearly evenly loosely tightly
"""


def tiny_corpus() -> list[str]:
    """The sample figures' caption vocabulary plus seeded strings of everyday words."""

    subjects = ("a figure", "a human figure", "an abstract figure", "a dotted figure", "a particle figure")
    facings = ("facing the viewer", "seen from the front", "facing forward", "facing left",
               "turned to the right", "in profile facing left", "with its head toward the right")
    lines = []
    for specs in POSES.values():
        for spec in specs:
            for template in spec.captions:
                for i, subj in enumerate(subjects):
                    lines.append(template.format(subj=subj, facing=facings[i % len(facings)],
                                                 side=("left", "right")[i % 2], other=("right", "left")[i % 2])
                                 + (", drawn in sparse black dots on white" if i == 3 else ""))
    words = _WORDS.split()
    rng = random.Random(0)  # random.Random's choice() is stable across Python versions
    return lines + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]



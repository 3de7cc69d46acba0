"""Word-problem templates and fillers for the arithmetic setting (written for this project).

Each template is a pair ``(prompt, suffix)``: the training text is ``prompt + " " + answer + suffix`` and the
evaluation prompt is ``prompt`` alone. Placeholders: ``{name}``, ``{name2}``, ``{n1}``, ``{n2}``, ``{obj}``
(plural noun), ``{box}`` / ``{boxes}`` (a container, singular/plural), ``{place}``.

``TRAIN_TEMPLATES`` are seen in training; ``HELDOUT_TEMPLATES`` are used only for evaluation prompts, so word-problem
accuracy measures whether the operation transfers to unseen phrasings (as in the authors' code,
docs/reference.md §3.1).
"""

from __future__ import annotations

NAMES = (
    "Ava", "Ben", "Chloe", "Dan", "Eva", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Kira", "Leo", "Maya", "Noah",
    "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yara", "Zoe", "Omar", "Lena", "Ravi",
    "the fox", "the owl", "the bear", "the robot", "the wizard", "the turtle",
)
OBJECTS = (
    "apples", "pens", "coins", "books", "stickers", "marbles", "shells", "cards", "stamps", "flowers", "cookies",
    "pebbles", "buttons", "candles", "rings", "kites", "balls", "cups", "beads", "leaves", "nails", "eggs",
)
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"), ("crate", "crates"),
              ("bowl", "bowls"), ("tray", "trays"), ("bin", "bins"))
PLACES = ("the park", "the market", "school", "the library", "the garden", "the beach", "the shop", "the farm")

# Numbers: for add/mul the prompt shows (n1, n2) and the answer is n1+n2 / n1*n2; for sub/div the generator draws
# the answer and n2 and sets n1 = answer + n2 / n1 = answer * n2, so every answer is a non-negative integer.
TRAIN_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "add": (
        ("{name} has {n1} {obj}. {name2} gives them {n2} more. Now {name} has", " {obj}."),
        ("There are {n1} {obj} in the {box} and {n2} {obj} on the table. Altogether there are", " {obj}."),
        ("{name} found {n1} {obj} at {place} and {n2} {obj} at home. In total {name} found", " {obj}."),
        ("A {box} holds {n1} {obj}. {name} adds {n2} {obj}. The {box} now holds", " {obj}."),
        ("{name} buys {n1} {obj} and then {n2} more {obj}. {name} bought", " {obj} in total."),
        ("On Monday {name} collects {n1} {obj}. On Tuesday {name} collects {n2}. Over two days that is", " {obj}."),
        ("{name} had {n1} {obj}. After a trip to {place}, {name} got {n2} more, so now there are", " {obj}."),
        ("{name} and {name2} pool their {obj}: {n1} and {n2}. Together they have", " {obj}."),
    ),
    "sub": (
        ("{name} has {n1} {obj}. {name} gives {n2} to {name2}. Now {name} has", " {obj}."),
        ("There are {n1} {obj} in the {box}. {n2} {obj} are taken out. Now there are", " {obj} left."),
        ("{name} brought {n1} {obj} to {place} and lost {n2}. {name} still has", " {obj}."),
        ("A {box} holds {n1} {obj}. {name} removes {n2} {obj}. The {box} now holds", " {obj}."),
        ("{name} had {n1} {obj} and sold {n2} of them. {name} kept", " {obj}."),
        ("{name} needs {n1} {obj} and already has {n2}. {name} still needs", " more {obj}."),
        ("Out of {n1} {obj}, {n2} were broken. The number of good {obj} is", "."),
        ("{name} counted {n1} {obj}, then {name2} ate {n2}. What remains is", " {obj}."),
    ),
    "mul": (
        ("{name} has {n1} {boxes} with {n2} {obj} in each. In total there are", " {obj}."),
        ("Each {box} holds {n2} {obj}. {name} fills {n1} {boxes}, which makes", " {obj}."),
        ("{name} buys {n1} packs of {obj} with {n2} in every pack. {name} now has", " {obj}."),
        ("There are {n1} rows of {obj} at {place} with {n2} {obj} per row. That is", " {obj} altogether."),
        ("For {n1} days {name} collects {n2} {obj} each day. After those days {name} has", " {obj}."),
        ("{n1} friends each bring {n2} {obj} to {place}. The friends bring", " {obj} in total."),
        ("{name} stacks {n2} {obj} in each of {n1} piles. The piles contain", " {obj}."),
        ("A shelf has {n1} {boxes} and every {box} has {n2} {obj}, so the shelf has", " {obj}."),
    ),
    "div": (
        ("{name} shares {n1} {obj} equally among {n2} friends. Each friend gets", " {obj}."),
        ("There are {n1} {obj} packed into {n2} {boxes} equally. Each {box} holds", " {obj}."),
        ("{name} splits {n1} {obj} into groups of {n2}. The number of groups is", "."),
        ("{n1} {obj} are placed in {n2} equal rows at {place}. Each row has", " {obj}."),
        ("{name} reads {n1} pages of {obj} in {n2} days, the same amount each day. Each day is", " pages."),
        ("A farmer puts {n1} {obj} into {boxes} of {n2}. The farmer fills", " {boxes}."),
        ("{name} and friends, {n2} people in all, share {n1} {obj}. Each person gets", " {obj}."),
        ("{n1} {obj} are divided into {n2} equal piles. One pile has", " {obj}."),
    ),
}

HELDOUT_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "add": (
        ("{name} picks {n1} {obj} in the morning and {n2} {obj} in the evening, for a total of", " {obj}."),
        ("After {name2} hands over {n2} {obj}, {name}, who had {n1}, owns", " {obj}."),
        ("At {place} there were {n1} {obj}; then {n2} more arrived, giving", " {obj}."),
        ("{name} puts {n1} {obj} and {n2} {obj} in one {box}. The {box} ends up with", " {obj}."),
    ),
    "sub": (
        ("{name} started with {n1} {obj} and used {n2} at {place}, leaving", " {obj}."),
        ("Of the {n1} {obj} in the {box}, {name2} takes {n2}, so the {box} keeps", " {obj}."),
        ("{n1} {obj} were on sale and {n2} were sold, which leaves", " {obj}."),
        ("{name} owes {n2} {obj} and pays them from a pile of {n1}. The pile shrinks to", " {obj}."),
    ),
    "mul": (
        ("{name} plants {n1} beds with {n2} {obj} in every bed, planting", " {obj}."),
        ("If one {box} carries {n2} {obj}, then {n1} {boxes} carry", " {obj}."),
        ("{name} earns {n2} {obj} per hour at {place}. After {n1} hours {name} has earned", " {obj}."),
        ("{n1} teams at {place} each get {n2} {obj}, so the teams get", " {obj}."),
    ),
    "div": (
        ("{name} hands out {n1} {obj} so that each of {n2} children gets the same. Every child receives", " {obj}."),
        ("To carry {n1} {obj} in {n2} trips with equal loads, each trip moves", " {obj}."),
        ("{n1} {obj} fill {n2} {boxes} evenly, so one {box} has", " {obj}."),
        ("{name} cuts {n1} {obj} into {n2} equal sets at {place}. Each set has", " {obj}."),
    ),
}

SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}

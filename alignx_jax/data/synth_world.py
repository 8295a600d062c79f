"""The synthetic persona world's vocabulary (`alignx_jax.data.synth` builds users and rows from it): per
implemented preference dimension the phrases that show each side in a response, a comment and a
demographic sentence; the posts pairs answer, the neutral base responses and filler demographics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Side:
    """Phrases that show one side (positive label = 1, negative = 0) of a dimension."""

    response: tuple[str, ...]  # appended to a pair's base response
    comment: tuple[str, ...]  # a UGC comment
    demographic: str = ""  # a demographic sentence ("" = this side is never stated)


@dataclass(frozen=True)
class WorldDim:
    index: int  # index into the 90-dim preference space
    name: str
    pos: Side
    neg: Side


WORLD: tuple[WorldDim, ...] = (
    WorldDim(
        0,
        "register",
        Side(
            (
                "tbh that's a vibe, go for it lol.",
                "ngl this slaps, just do it.",
                "lowkey the best move, trust me.",
            ),
            ("lol same, this is so me tbh", "ngl this made my day, big mood", "omg yes, saving this fr"),
            "A university student in their early twenties.",
        ),
        Side(
            (
                "I would kindly recommend a measured approach.",
                "In my experience, patience serves one well.",
                "One would be well advised to proceed calmly.",
            ),
            (
                "Quite right. In my day we did the same.",
                "A sensible post. My grandchildren agree.",
                "Well put. Experience teaches this slowly.",
            ),
            "A retired teacher in their late sixties.",
        ),
    ),
    WorldDim(
        3,
        "extraversion",
        Side(
            (
                "Invite a few friends and make it a party!",
                "Grab your crew and go out together!",
                "Call people over, the more the merrier!",
            ),
            (
                "I'd throw a party for this, who's in?",
                "Love meeting new people at events like this!",
                "Count me in, I'll bring the whole group!",
            ),
            "Outgoing, loves big gatherings.",
        ),
        Side(
            (
                "Enjoy some quiet time on your own.",
                "A calm evening alone can recharge you.",
                "Keep it low-key and stay in.",
            ),
            (
                "I'd rather stay home with a book honestly.",
                "Crowds drain me, quiet nights are best.",
                "Sounds nice but I prefer my own company.",
            ),
            "Quiet and introverted, prefers staying in.",
        ),
    ),
    WorldDim(
        5,
        "agreeableness",
        Side(
            (
                "What a kind question, you are on the right track.",
                "That sounds lovely, it will go well.",
                "Great thinking, you clearly care about this.",
            ),
            (
                "Such a kind post, sending good wishes!",
                "You are doing great, be proud of yourself.",
                "Lovely idea, thank you for sharing.",
            ),
        ),
        Side(
            (
                "Blunt answer: you are overthinking it.",
                "Frankly, that plan has obvious flaws.",
                "Honestly, stop asking and just decide.",
            ),
            (
                "This is a silly question, to be frank.",
                "Wrong take. Nobody needs this advice.",
                "Meh, overrated. Try harder next time.",
            ),
        ),
    ),
    WorldDim(
        16,
        "concise",
        Side(
            ("That's all.", "Simple as that.", "Short and sweet."),
            (
                "Too long, give me the short version.",
                "Short version please, keep it brief.",
                "Brief answers are the best answers.",
            ),
        ),
        Side(
            (
                "First, list your options; then compare the costs; finally, check the details before you commit.",
                "Step by step: set a goal, write a schedule, track progress daily and review it weekly.",
                "In detail: gather information, ask someone experienced, plan each stage "
                "and leave time for surprises.",
            ),
            (
                "Could you explain every step in more depth? I want the full picture.",
                "I love long, thorough write-ups with all the details.",
                "Please add more background and examples, details matter to me.",
            ),
        ),
    ),
    WorldDim(
        56,
        "sports",
        Side(
            (
                "A quick football match would help too.",
                "Try a game of tennis to reset.",
                "Watching the big match is a great break.",
            ),
            (
                "Reminds me of match day with my team!",
                "I play football every weekend, love it.",
                "Nothing beats a good game of basketball.",
            ),
            "Plays in a local football league.",
        ),
        Side(
            (
                "A slow puzzle would help too.",
                "Try a good film to reset.",
                "Reading a novel is a great break.",
            ),
            (
                "Sports bore me, I never watch games.",
                "I can't stand football talk, honestly.",
                "Not into sports at all, never was.",
            ),
            "Has no interest in sports.",
        ),
    ),
    WorldDim(
        59,
        "pets",
        Side(
            (
                "Take your dog along, pets make it better.",
                "Cuddle your cat afterwards.",
                "Adopting a puppy could bring joy.",
            ),
            (
                "My cat would love this, pets are family.",
                "I walk my dog every morning, best part of the day.",
                "Aww, I adore animals so much.",
            ),
            "Lives with two dogs and a cat.",
        ),
        Side(
            (
                "Keep your space tidy and quiet.",
                "Enjoy a peaceful, animal-free home.",
                "A clean flat makes rest easier.",
            ),
            (
                "I'm allergic to cats and not a pet person.",
                "Animals in the house? No thanks.",
                "Pets are too much work for me.",
            ),
            "Keeps a pet-free home.",
        ),
    ),
    WorldDim(
        60,
        "travel",
        Side(
            (
                "Book a weekend trip somewhere new.",
                "Plan a journey abroad, travel refreshes you.",
                "Pack a bag and explore a new city.",
            ),
            (
                "This reminds me of my trip to Japan!",
                "I travel every chance I get, airports feel like home.",
                "Adding this to my travel list for next summer.",
            ),
            "Has visited thirty countries.",
        ),
        Side(
            (
                "Stay close to home and keep your routine.",
                "No need to go anywhere, home is best.",
                "Skip the trip and relax locally.",
            ),
            (
                "I hate flying, I prefer staying put.",
                "Travel stresses me out, home is enough.",
                "Never liked packing bags and long trips.",
            ),
            "Rarely leaves their hometown.",
        ),
    ),
    WorldDim(
        64,
        "gourmet_food",
        Side(
            (
                "Treat yourself to a fine dinner at a new restaurant.",
                "Cook a fancy meal with fresh herbs.",
                "Try a tasting menu, good food lifts the mood.",
            ),
            (
                "That pasta looks amazing, I'm a real foodie.",
                "I cook gourmet dinners every Sunday.",
                "The best part is always the food, yum.",
            ),
            "Works as a chef.",
        ),
        Side(
            (
                "Any quick snack will do.",
                "Grab simple fuel and move on.",
                "Skip the fancy meal, eat whatever.",
            ),
            (
                "I eat the same plain meal every day, food is fuel.",
                "Fancy restaurants are a waste of money.",
                "Don't care about food, a sandwich is fine.",
            ),
        ),
    ),
    WorldDim(
        71,
        "digital_technology",
        Side(
            (
                "Use an app to track it, technology makes it easy.",
                "A simple script or gadget can automate this.",
                "Try a smart device, the software helps a lot.",
            ),
            (
                "Just built my own PC, love new gadgets!",
                "I code apps in my free time.",
                "Tech upgrades like this make me happy.",
            ),
            "Works as a software engineer.",
        ),
        Side(
            (
                "Use pen and paper, no screens needed.",
                "Put the phone away and do it by hand.",
                "Go offline, gadgets only distract.",
            ),
            (
                "I avoid screens, technology is overrated.",
                "Still use a flip phone and proud of it.",
                "Too many apps these days, I log off.",
            ),
            "Avoids smartphones.",
        ),
    ),
    WorldDim(
        73,
        "humor",
        Side(
            (
                "Worst case, blame the weather, ha!",
                "Why did the plan cross the road? To get done, haha.",
                "Just don't let your socks find out, hehe.",
            ),
            (
                "Haha, this had me laughing out loud!",
                "Best joke I've read all week, lmao.",
                "I live for puns like this, brilliant.",
            ),
        ),
        Side(
            (
                "This is a serious matter, treat it carefully.",
                "No jokes here, just a plain answer.",
                "Take it seriously and stay focused.",
            ),
            (
                "Not funny. Jokes just get in the way.",
                "Please keep threads like this serious.",
                "I don't see the humor here at all.",
            ),
        ),
    ),
)
WORLD_DIMS: tuple[int, ...] = tuple(d.index for d in WORLD)

POSTS: tuple[str, ...] = (
    "Any ideas for a free Saturday?",
    "How do I unwind after work?",
    "What should I do on a rainy day?",
    "Tips for starting a new hobby?",
    "How can I make mornings better?",
    "Bored tonight, suggestions?",
    "How do I celebrate a small win?",
    "Ideas for a long weekend?",
    "How do I get out of a slump?",
    "What is a good way to spend a bonus?",
    "How do I plan the new year?",
    "Best way to spend a day off?",
    "How can I feel less stressed?",
    "Got a free evening, what now?",
    "How do I reward myself?",
    "What should I try this month?",
    "Ideas for a birthday treat?",
    "How do I recharge on Sunday?",
    "Need a break from studying, ideas?",
    "How do I make this week fun?",
    "What helps after a bad day?",
    "How do I spend my holiday?",
    "Any plans worth making for spring?",
    "How do I beat the winter blues?",
    "What to do when I feel stuck?",
    "How do I enjoy my lunch break?",
    "Ideas for a quiet Friday?",
    "How do I stay motivated?",
    "What is a fun goal for summer?",
    "How do I fill an empty afternoon?",
    "What should I do after exams?",
    "How can I start the week well?",
)
BASES: tuple[str, ...] = (
    "Start with something small and easy.",
    "Pick one idea and try it today.",
    "Keep it simple and see how you feel.",
    "Choose what gives you energy.",
    "Set aside an hour just for yourself.",
    "Try something you have never done.",
    "Make a small plan and stick to it.",
    "Do what feels right for you.",
    "Give yourself permission to slow down.",
    "A little change can go a long way.",
)
FILLER_DEMOGRAPHICS: tuple[str, ...] = (
    "Lives in a mid-sized city.",
    "Works full time.",
    "Has a busy schedule.",
)

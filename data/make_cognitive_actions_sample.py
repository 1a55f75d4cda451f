"""Write data/cognitive_actions_sample.jsonl: first-person texts, each showing one cognitive action.

The schema follows the cognitive-actions dataset (text, primary_cognitive_action, domain, complexity,
perspective, format_type, metadata). Each text is a real-life situation (who, what happened) followed by
two sentences in which the writer performs the labelled cognitive action on that situation. The output is
deterministic: the same script writes the same bytes.

    python data/make_cognitive_actions_sample.py            # 22 texts per label, 990 in all
"""
import json
import os
import random

PER_LABEL = 22
SEED = 0
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cognitive_actions_sample.jsonl")

# (domain, setup sentence, person, thing, event): the situation the writer is in
SITUATIONS = [
    ("work", "Last Tuesday my manager moved our product launch up by two full weeks.", "my manager",
     "the launch plan", "the schedule change"),
    ("work", "During Friday's team review a colleague said my report was confusing in front of everyone.",
     "my colleague", "my report", "the review"),
    ("work", "I was passed over for the team lead role that I had quietly been hoping to get.", "my boss",
     "the promotion", "the announcement"),
    ("family", "My dad called on Sunday to tell me he wants to sell the house I grew up in.", "my dad",
     "selling the house", "that phone call"),
    ("family", "My sister and I had a tense argument about who should look after our mother this winter.",
     "my sister", "our mother's care", "the argument"),
    ("parenting", "My nine-year-old came home from school crying because nobody sat with her at lunch.",
     "my daughter", "her lunch break", "her coming home upset"),
    ("school", "I got my statistics midterm back yesterday with a grade far lower than I expected.",
     "my professor", "the midterm", "getting the grade back"),
    ("school", "Our group project fell apart two days before the deadline when one member stopped answering.",
     "the member who went silent", "the group project", "the missed messages"),
    ("health", "My doctor told me at my checkup that my blood pressure has crept up over the past year.",
     "my doctor", "my blood pressure", "the checkup"),
    ("health", "I twisted my knee on a morning run and had to cancel the half marathon I trained for.",
     "my physiotherapist", "the half marathon", "the injury"),
    ("relationships", "My partner mentioned over dinner that they feel I am always on my phone.", "my partner",
     "my phone habit", "that dinner conversation"),
    ("friendship", "My oldest friend forgot my birthday this year, which has never happened before.",
     "my friend", "our friendship", "the forgotten birthday"),
    ("friendship", "A friend asked to borrow a fairly large amount of money to cover her rent.", "my friend",
     "the loan", "her request"),
    ("money", "When I opened my credit card statement this month the total was almost twice my budget.",
     "my bank", "my spending", "opening the statement"),
    ("housing", "Our landlord sent a letter saying the rent will go up by fifteen percent in March.",
     "our landlord", "the rent increase", "the letter"),
    ("neighbors", "The new neighbors upstairs have been playing loud music past midnight most weeknights.",
     "the neighbors", "the noise", "last night's music"),
    ("career", "I have been offered a job in another city that pays more but means leaving everyone I know.",
     "the recruiter", "the job offer", "the offer call"),
    ("hobbies", "After six months of guitar lessons I still cannot play a full song without stopping.",
     "my guitar teacher", "learning guitar", "yesterday's lesson"),
    ("travel", "Our flight home was cancelled and the airline could not rebook us for three days.",
     "the gate agent", "getting home", "the cancellation"),
    ("community", "At the town meeting I volunteered to organise the park clean-up and only four people signed up.",
     "the council member", "the clean-up", "the sign-up sheet"),
    ("cooking", "I hosted dinner for my in-laws and the main dish came out of the oven badly overcooked.",
     "my mother-in-law", "the dinner", "taking the dish out"),
    ("technology", "My laptop died the night before a deadline and I lost an afternoon of unsaved work.",
     "the repair technician", "the lost work", "the crash"),
    ("sports", "Our coach benched me for the final game of the season without really explaining why.",
     "my coach", "the final game", "being benched"),
    ("caregiving", "My grandfather has started repeating the same stories several times in one visit.",
     "my grandfather", "his memory", "Sunday's visit"),
]

# label -> sentences that perform the action on the situation; {person}, {thing}, {event} are filled in
ACTIONS = {
    "reconsidering": [
        "At first I was sure my reaction to {thing} was right, but I went back over it and I am not so certain now.",
        "I had already made up my mind about {person}, and tonight I took that decision apart again piece by piece.",
        "Maybe I decided too fast after {event}, so I am giving the other option a fair second look.",
    ],
    "reframing": [
        "Instead of treating {thing} as a disaster, I am starting to see it as a chance to change how I do things.",
        "I kept calling {event} a failure, then I described it to myself as feedback and it felt completely different.",
        "What felt like {person} working against me might actually be {person} pushing me toward something better.",
    ],
    "noticing": [
        "I caught myself clenching my jaw whenever {thing} came up, which I had never paid attention to before.",
        "Somewhere in the middle of {event} I noticed that my voice had gone quiet and flat.",
        "I realised I check my messages every few minutes when I am worried about {thing}.",
    ],
    "perspective_taking": [
        "I tried to imagine what {event} looked like from where {person} was standing.",
        "If I were {person}, with their worries and their week, I would probably have acted the same way.",
        "I asked myself what {person} actually needed from me, rather than what I wanted to say.",
    ],
    "questioning": [
        "Why do I assume {thing} has to go the way it always has?",
        "I keep asking myself what evidence I really have that {person} meant it the way I heard it.",
        "Is the problem really {thing}, or is it something I have not named yet?",
    ],
    "abstracting": [
        "Stepping back from the details, {event} is really about how I handle losing control over plans.",
        "Underneath {thing} there is a general rule I live by: I try to earn approval before I rest.",
        "If I strip away the specifics, this is the same kind of problem as every trade-off between safety and growth.",
    ],
    "concretizing": [
        "Instead of saying I need to deal with {thing}, I wrote down three specific steps and a date for each.",
        "Feeling bad is vague, so I pinned it down: I will call {person} at six on Thursday and ask one question.",
        "I turned my fuzzy worry about {thing} into a list with numbers, names and deadlines.",
    ],
    "connecting": [
        "It suddenly linked up with something from last year, when I reacted to a similar problem in exactly the same way.",
        "I saw how {thing} is tied to my sleep, my mood and the way I spoke to {person} that week.",
        "This reminded me of what my old teacher said about patience, and the two ideas clicked together.",
    ],
    "distinguishing": [
        "I had to separate what {person} actually said from the tone I imagined behind it.",
        "There is a difference between being disappointed about {thing} and being ashamed of it, and I feel the first, not the second.",
        "I sorted the parts of {event} I could control from the parts I never could.",
    ],
    "updating_beliefs": [
        "I used to believe {person} did not care, but what happened this week showed me I was wrong.",
        "Given what I learned from {event}, I have changed my estimate of how risky {thing} really is.",
        "The new information made me drop an old assumption I had held for years without checking it.",
    ],
    "suspending_judgment": [
        "I am not going to decide what {event} means until I have talked to {person} properly.",
        "Part of me wanted to label {person} as selfish, but I am holding off until I know more.",
        "For now I am letting {thing} stay unresolved in my head instead of forcing a verdict.",
    ],
    "pattern_recognition": [
        "This is the third time a situation like {event} has come up, and each time I respond by withdrawing.",
        "I can see a pattern: whenever {thing} gets stressful, I start taking on extra work to feel useful.",
        "Looking at the last few months, the arguments with {person} always start on Sunday evenings.",
    ],
    "zooming_out": [
        "In the context of my whole life, {event} is one hard week, not the whole story.",
        "When I think about where I want to be in five years, {thing} looks much smaller than it did this morning.",
        "I pulled back to look at the bigger picture of the year instead of just today.",
    ],
    "zooming_in": [
        "I focused on the exact moment during {event} when things went wrong, second by second.",
        "Instead of thinking about {thing} in general, I looked closely at one single sentence that bothered me.",
        "I went through the details one at a time: what was said, who was in the room, and what I did with my hands.",
    ],
    "analogical_thinking": [
        "Dealing with {thing} feels like learning to swim: fighting the water makes you sink faster.",
        "It is like a garden that was neglected for a season; it does not need replacing, just steady care.",
        "I compared {event} to a chess game where I reacted to every move instead of having a plan.",
    ],
    "counterfactual_reasoning": [
        "If I had spoken to {person} a week earlier, {event} might never have happened at all.",
        "I keep running the other version where I said no, and I honestly think things would be worse now.",
        "Had I prepared differently for {thing}, the outcome would probably have changed only a little.",
    ],
    "hypothesis_generation": [
        "Maybe {person} is under pressure I do not know about; or maybe they are simply tired; or maybe it is about me.",
        "I came up with three possible explanations for {event} and wrote down how I could test each one.",
        "One idea is that {thing} went wrong because of timing, another is that I misjudged what people wanted.",
    ],
    "meta_awareness": [
        "I became aware that I was replaying {event} in a loop rather than actually thinking about it.",
        "Halfway through the evening I realised my mind had been somewhere else entirely, chewing on {thing}.",
        "I noticed the story I was telling myself about {person}, and that it was a story, not the facts.",
    ],
    "accepting": [
        "I cannot change {event} now, and I am slowly making peace with that.",
        "It hurts, but {thing} is what it is, and fighting it all night is not helping me.",
        "I am letting myself accept that {person} may never see it the way I do.",
    ],
    "remembering": [
        "It brought back the summer I was twelve, when something very similar happened with my cousin.",
        "I remembered exactly what {person} told me two years ago, word for word, standing in the kitchen.",
        "I went back through old messages to recall how I handled {thing} the last time.",
    ],
    "understanding": [
        "Now I finally understand why {person} reacted so strongly; it was never really about {thing}.",
        "After reading up on it, I get how {thing} actually works and why it went the way it did.",
        "It made sense once I saw the whole chain of events that led to {event}.",
    ],
    "applying": [
        "I used the budgeting method from the course I took last spring to work through {thing}.",
        "I tried the advice my therapist gave me, naming the feeling first, the next time {person} brought it up.",
        "I took the checklist I use at work and applied it to {thing} at home.",
    ],
    "analyzing": [
        "I broke {event} down into its parts: what triggered it, what I assumed, and what I did next.",
        "I listed every factor behind {thing} and weighed how much each one really contributed.",
        "Looking at it piece by piece, the main cause was the timing, not anything {person} said.",
    ],
    "evaluating": [
        "I weighed the options for {thing} against what matters most to me and rated each one honestly.",
        "Judging by the results so far, the way I handled {event} worked better than I gave myself credit for.",
        "I compared the costs and benefits of staying quiet with {person} and decided it is not worth it.",
    ],
    "creating": [
        "I sketched out a completely new plan for {thing} that nobody had suggested yet.",
        "I invented a small weekly ritual with {person} to make space for the things we never talk about.",
        "I designed my own system of colored notes to keep {thing} from overwhelming me again.",
    ],
    "divergent_thinking": [
        "I wrote down every possible way to handle {thing}, even silly ones, and ended up with twenty ideas.",
        "What if I treated {event} as a game, or a project, or a story I am writing? Each angle gave me new options.",
        "I brainstormed with no filter: move, ask {person} for help, change the timing, drop it, or make it public.",
    ],
    "convergent_thinking": [
        "From all the options for {thing}, I narrowed it down to the single one that fits my time and money.",
        "I crossed off ideas one by one until only the most practical answer was left.",
        "After listing possibilities, I chose the plan that solves the most problems with {person} at once.",
    ],
    "cognition_awareness": [
        "I realised I think much more clearly about {thing} in the morning than late at night.",
        "I am aware that I tend to jump to the worst case when I am tired, and that is happening now.",
        "I noticed that my thinking about {person} gets rigid whenever I feel criticised.",
    ],
    "metacognitive_monitoring": [
        "Halfway through my reasoning about {thing} I checked whether I actually understood the numbers, and I did not.",
        "I kept asking myself if my plan for {event} was working or if I was just going through the motions.",
        "I rated how confident I was about {person}'s motives and it was honestly only about forty percent.",
    ],
    "metacognitive_regulation": [
        "Since ruminating was not working, I switched strategy and wrote the problem out on paper.",
        "I noticed I was getting nowhere with {thing}, so I stopped, took a walk, and came back with a fresh approach.",
        "I decided to slow down and check each assumption about {event} before reacting again.",
    ],
    "self_questioning": [
        "What am I really afraid of here, if I am honest with myself about {thing}?",
        "I asked myself whether I am upset with {person} or with myself.",
        "Would I give a friend the same harsh judgment I am giving myself about {event}?",
    ],
    "emotional_reappraisal": [
        "The anxiety I felt about {thing} might actually be excitement about something that matters to me.",
        "I decided to read my anger at {person} as a sign that I care, not as a sign that I am bitter.",
        "Seeing {event} as a hard lesson instead of a humiliation took some of the sting out of it.",
    ],
    "emotion_receiving": [
        "I just let the sadness about {thing} be there for a while without trying to fix it.",
        "When {person} told me how hurt they were, I simply listened and took it in.",
        "I sat with the disappointment from {event} and allowed myself to feel it fully.",
    ],
    "emotion_responding": [
        "I reached out to {person} right away because the guilt I felt needed some kind of action.",
        "I let myself cry in the car after {event}, and then I called someone to talk it through.",
        "The frustration pushed me to respond, so I wrote {person} a calm but honest message.",
    ],
    "emotion_valuing": [
        "I realised my worry about {thing} shows how much I value being reliable to others.",
        "This feeling matters to me; it tells me {person} is more important to me than I admit.",
        "I decided my hurt over {event} is worth taking seriously rather than brushing aside.",
    ],
    "emotion_organizing": [
        "I have so many feelings about {thing} that I tried to sort them: fear first, then anger, then some relief.",
        "I worked out which of my emotions about {person} belong to now and which belong to old history.",
        "Putting my reactions to {event} in order helped me see which one to deal with first.",
    ],
    "emotion_characterizing": [
        "I am someone who feels things deeply, and {event} showed me that this is part of who I am.",
        "My calm response to {thing} feels like it now comes from my values rather than from effort.",
        "I think steadiness under pressure has become a core part of my character, and this week proved it.",
    ],
    "situation_selection": [
        "I chose not to go to the gathering where I knew {person} would be, at least this time.",
        "I decided to avoid reading comments about {thing} before bed because they always wind me up.",
        "I picked a quiet café instead of the busy bar for the talk with {person}.",
    ],
    "situation_modification": [
        "I asked {person} if we could move the conversation to the morning when I am calmer.",
        "I changed the setup of {thing} so there is less room for the same problem to repeat.",
        "Before things escalated during {event}, I suggested we take a break and sit down.",
    ],
    "attentional_deployment": [
        "Instead of staring at {thing}, I turned my attention to the dinner I was cooking.",
        "I kept my focus on my breathing and the sound of the rain instead of replaying {event}.",
        "Whenever my mind drifted back to {person}, I gently moved it to the task in front of me.",
    ],
    "response_modulation": [
        "I wanted to snap at {person}, but I kept my voice level and waited.",
        "I held back the tears during {event} and let them out later at home.",
        "I took a long breath and unclenched my fists before I answered anything.",
    ],
    "emotion_perception": [
        "I could tell from {person}'s face that they were more worried than angry.",
        "I recognised the tightness in my chest as fear, not just stress about {thing}.",
        "During {event} I picked up on a nervousness in the room that nobody mentioned.",
    ],
    "emotion_facilitation": [
        "I used the restless energy from {event} to finally clean out the garage.",
        "Being a little anxious actually sharpened my focus when I prepared for {thing}.",
        "My sadness made me slower and more careful, which helped when I wrote to {person}.",
    ],
    "emotion_understanding": [
        "I worked out that my irritation with {person} was really disappointment that had built up over time.",
        "I understood how my embarrassment about {thing} had turned into defensiveness.",
        "It makes sense that {event} left me feeling both relief and grief at the same time.",
    ],
    "emotion_management": [
        "I planned ahead how I would stay steady if {person} raised {thing} again.",
        "I managed my nerves by preparing, sleeping properly and calling a friend before {event}.",
        "When the anger came, I named it, gave it ten minutes, and then decided what to do.",
    ],
}

OPENERS = {"journal_entry": ["Journal, Thursday night.", "Writing this before bed.", "Notes to myself today."],
           "reflection": ["", "", ""],
           "conversation_recap": ["I talked this over with a friend today.", "I told my therapist about this.",
                                  "I went over it out loud on the phone with my brother."],
           "note_to_self": ["Note to self.", "Something to remember.", "Reminder for future me."]}
CLOSINGS = ["I still do not know how it will turn out.", "It was a small shift, but it mattered to me.",
            "I want to remember this the next time something similar happens.", "",
            "It did not fix everything, but I slept better.", "Tomorrow I will see if it holds up."]


def main(out=OUT, per_label=PER_LABEL):
    rng = random.Random(SEED)
    records, seen = [], set()
    for label, sentences in ACTIONS.items():
        combos = [(s, a, b) for s in range(len(SITUATIONS)) for a in range(3) for b in range(3) if a != b]
        rng.shuffle(combos)
        made = 0
        for s, a, b in combos:
            if made == per_label:
                break
            domain, setup, person, thing, event = SITUATIONS[s]
            format_type = rng.choice(sorted(OPENERS))
            opener = rng.choice(OPENERS[format_type])
            body = " ".join(x.format(person=person, thing=thing, event=event) for x in (sentences[a], sentences[b]))
            parts = [opener, setup, body[0].upper() + body[1:], rng.choice(CLOSINGS)]
            text = " ".join(p for p in parts if p)
            n_words = len(text.split())
            if text in seen or not 30 <= n_words <= 120:
                continue
            seen.add(text)
            made += 1
            records.append({
                "text": text, "primary_cognitive_action": label, "domain": domain,
                "complexity": "simple" if n_words < 58 else "moderate" if n_words < 70 else "complex",
                "perspective": "first_person", "format_type": format_type,
                "metadata": {"generator": "data/make_cognitive_actions_sample.py", "seed": SEED,
                             "situation": s, "sentences": [a, b], "n_words": n_words}})
        assert made == per_label, f"only {made} texts for {label}"
    rng.shuffle(records)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(out + ".tmp", out)
    print(f"wrote {len(records)} examples, {len(ACTIONS)} labels, to {out}")


if __name__ == "__main__":
    main()
